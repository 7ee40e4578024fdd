"""Continued pretraining from a Hugging Face directory of any architecture, without Ray: the FSDP wrap units,
the source's weights and tokenizer, and its position limit (the Ray run is tests/integration/train)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from llmstack.config import TrainConfig, LoopConfig, load_config  # noqa: E402
from llmstack.errors import ConfigError  # noqa: E402
from llmstack.serve._testing import ARCHITECTURES  # noqa: E402
from llmstack.train import parallel  # noqa: E402
from llmstack.train.driver import _tokenizer, build_from_weights, train  # noqa: E402
from llmstack.train.loop import LocalSession, LoopSpec, run_worker_loop  # noqa: E402

LAYER_CLASS = {"llama": "LlamaDecoderLayer", "qwen2": "Qwen2DecoderLayer", "mistral": "MistralDecoderLayer",
               "gemma3": "Gemma3DecoderLayer", "phi3": "Phi3DecoderLayer", "gpt2": "GPT2Block"}


def _source(architecture_dir: Any, architecture: str) -> Any:
    from llmstack.models import load_artifact

    return load_artifact(str(architecture_dir(architecture)), with_tokenizer=False).model


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_wrap_units_are_the_decoder_layers_of_each_architecture(architecture: str, architecture_dir: Any) -> None:
    model = _source(architecture_dir, architecture)
    layers = parallel.decoder_layers(model)
    assert [type(m).__name__ for m in layers] == [LAYER_CLASS[architecture]] * model.config.num_hidden_layers
    for module in model.modules():  # a model that declares no _no_split_modules: the repeated blocks
        module._no_split_modules = None
    assert [id(m) for m in parallel.decoder_layers(model)] == [id(m) for m in layers]


def test_repeated_blocks_fallback_picks_the_largest_stack_of_identical_layers() -> None:
    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)

    model = torch.nn.Module()
    model.heads = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(3)])  # smaller stack
    model.blocks = torch.nn.ModuleList([Block() for _ in range(4)])
    model.mixed = torch.nn.ModuleList([Block(), torch.nn.Linear(64, 64)])  # not one class
    assert parallel.decoder_layers(model) == list(model.blocks)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_model_rebuilt_on_a_worker_is_the_source(architecture: str, architecture_dir: Any) -> None:
    source = _source(architecture_dir, architecture)
    rebuilt = build_from_weights(source.config.to_dict(), [source.state_dict()])
    assert type(rebuilt) is type(source)
    ids = torch.randint(0, source.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(input_ids=ids).logits, source(input_ids=ids).logits)


@pytest.fixture()
def process_group(tmp_path: Path) -> Any:
    """A one-process gloo group, so DDP and FSDP2 really wrap (Ray Train creates it for real runs)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_loop_trains_the_source_weights_under_ddp_and_fsdp(architecture: str, strategy: str, architecture_dir: Any,
                                                           architecture_tokenizer: Any, process_group: Any,
                                                           tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from llmstack.data import load_corpus, pack_corpus

    source = _source(architecture_dir, architecture)
    packed = pack_corpus(load_corpus("builtin:stdlib", max_documents=40), architecture_tokenizer, block_size=32)
    factory = functools.partial(build_from_weights, source.config.to_dict(), [source.state_dict()])
    session = LocalSession(tmp_path / "ckpt")
    training = LoopConfig(max_steps=2, micro_batch_size=2, learning_rate=1e-3, warmup_steps=0, eval_every=2,
                              eval_batches=1, checkpoint_every=2)
    run_worker_loop(LoopSpec(model_factory=factory), {"input_ids": packed.train}, {"input_ids": packed.eval},
                    training, strategy=strategy, session=session)
    assert [r["step"] for r in session.records] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in session.records)
    trained = load_file(str(tmp_path / "ckpt" / "checkpoint_000002" / "model.safetensors"))
    start = source.state_dict()
    assert set(trained) <= set(start)  # plain module names: loads into the source's architecture
    changed = [k for k in trained if not torch.equal(trained[k], start[k])]
    assert changed  # trained from the source's weights, which moved
    rebuilt = factory()
    rebuilt.load_state_dict(trained, strict=False)


def _config(source: str, registry_root: Path, **data: Any) -> TrainConfig:
    return load_config(TrainConfig, {"name": "cpt", "registry": str(registry_root),
                                     "model": {"source": source},
                                     "data": {"source": "builtin:stdlib", "max_documents": 40, **data}})


def test_block_size_beyond_gpt2_positions_is_refused_before_any_work(architecture_dir: Any, tmp_path: Path) -> None:
    cfg = _config(str(architecture_dir("gpt2", max_positions=32)), tmp_path / "registry", block_size=64)
    with pytest.raises(ConfigError) as info:
        train(cfg, progress=False)
    message = str(info.value)
    assert "data.block_size: 64 tokens exceed the model's 32 positions" in message
    assert "model.source=" in message


def test_tokenizer_defaults_to_the_sources_and_packing_uses_it(architecture_dir: Any, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from llmstack.data import prepare_training_data
    from llmstack.finetune.lora import ensure_base_ref
    from llmstack.models import load_artifact
    from llmstack.registry import Registry

    registry = Registry(str(tmp_path / "registry"))
    directory = architecture_dir("qwen2")
    ref = ensure_base_ref(str(directory), registry, name="qwen2-tiny")
    for source, expected_ref in ((str(directory), None), (str(ref), str(ref))):
        cfg = _config(source, tmp_path / "registry", block_size=32)
        assert cfg.data.tokenizer is None
        model = load_artifact(source, registry=registry, with_tokenizer=False).model
        tokenizer, tokenizer_ref = _tokenizer(cfg, registry, model)
        assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(str(directory)).get_vocab()
        assert (str(tokenizer_ref) if tokenizer_ref else None) == expected_ref
        _, packed, _ = prepare_training_data(cfg.data, tokenizer=tokenizer, progress=False)
        blocks = torch.cat([packed.train, packed.eval])
        assert int(blocks.max()) < len(tokenizer) and (blocks == tokenizer.eos_token_id).any()
        _, own, _ = prepare_training_data(cfg.data, tokenizer=AutoTokenizer.from_pretrained(str(directory)),
                                          progress=False)
        assert own.fingerprint == packed.fingerprint and torch.equal(own.train, packed.train)
