"""dtypes as stored: a bf16 base loads, fine-tunes, merges and is written in bf16; float32 only when asked."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from llmstack.errors import ModelLoadError
from llmstack.models import describe_artifact, load_artifact, register_model
from llmstack.models.artifact import resolve_dtype, stored_dtype


def _safetensors_dtypes(directory: Path) -> set[str]:
    from safetensors import safe_open

    found = set()
    for path in directory.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            found |= {str(handle.get_slice(key).get_dtype()) for key in handle.keys()}
    return found


@pytest.fixture(scope="module")
def bf16_world(ft: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A tiny random-init LLaMA stored in bf16 (from LlamaConfig), registered as ``bf16@v1``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmstack.data import load_corpus, trained_tokenizer
    from llmstack.finetune.data import instruction_tensors
    from llmstack.registry import Registry

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("bf16")
    tokenizer = trained_tokenizer(load_corpus("builtin:stdlib", max_documents=40), vocab_size=384)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    registry = Registry(str(root / "registry"))
    ref = register_model(registry, "bf16", model, tokenizer)
    data = instruction_tensors(ft.QA, tokenizer, max_length=ft.BLOCK, max_rows=24)
    yield {"registry": registry, "ref": ref, "tokenizer": tokenizer, "data": data, "root": root}
    torch.set_num_threads(threads)


def test_a_bf16_base_loads_in_bf16_unless_asked_otherwise(bf16_world: dict[str, Any]) -> None:
    registry, ref = bf16_world["registry"], bf16_world["ref"]
    directory = describe_artifact(ref, registry=registry).directory
    assert stored_dtype(directory) == "bfloat16"
    assert _safetensors_dtypes(directory) == {"BF16"}
    assert load_artifact(ref, registry=registry).model.dtype == torch.bfloat16
    assert load_artifact(ref, registry=registry, dtype="float32").model.dtype == torch.float32
    assert load_artifact(ref, registry=registry, dtype="bf16").model.dtype == torch.bfloat16


def test_stored_dtype_reads_either_key_and_defaults_to_float32(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "float16"}))
    assert stored_dtype(tmp_path) == "float16"
    (tmp_path / "config.json").write_text(json.dumps({"dtype": "bfloat16", "torch_dtype": "float16"}))
    assert stored_dtype(tmp_path) == "bfloat16"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert stored_dtype(tmp_path) == "float32"
    assert resolve_dtype("auto", tmp_path) == "float32"
    with pytest.raises(ModelLoadError, match=r"dtype 'int3' is not one of auto, .*bfloat16"):
        resolve_dtype("int3", tmp_path)


def test_lora_on_a_bf16_base_trains_and_merges_into_bf16(bf16_world: dict[str, Any], ft: Any) -> None:
    from llmstack.finetune.adapters import merge_adapter
    from llmstack.models.adapters import adapter_context

    run = ft.run_local(bf16_world, "lora", bf16_world["root"] / "runs", steps=2, lr=1e-2)
    model = run["factory"]()
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    trained = {p.dtype for p in model.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trained == {torch.float32}  # base as stored, adapter in fp32
    assert math.isfinite(run["after"])  # bf16-base training gives a real held-out loss

    registry = bf16_world["registry"]
    adapter = ft.register(bf16_world, run, "bf16-lora")
    merged = merge_adapter(registry, adapter)
    manifest = registry.manifest(merged)
    assert manifest.extra["dtype"] == "bfloat16"
    directory = registry.fetch(merged)
    assert _safetensors_dtypes(directory) == {"BF16"} and stored_dtype(directory) == "bfloat16"

    # The merged bf16 model computes what the adapter on its bf16 base computes (bf16 rounding apart).
    ids = bf16_world["data"].eval["input_ids"][:2]
    with torch.no_grad():
        merged_logits = load_artifact(merged, registry=registry).model(input_ids=ids).logits.float()
        on_base = load_artifact(adapter, registry=registry).model
        with adapter_context(on_base, "default"):
            adapter_logits = on_base(input_ids=ids).logits.float()
        base_logits = load_artifact(bf16_world["ref"], registry=registry).model(input_ids=ids).logits.float()
    assert not torch.allclose(adapter_logits, base_logits, atol=1e-3)  # the adapter changed something
    # what a replica serves: load_artifact's default dtype is the stored one
    assert load_artifact(str(merged), registry=registry).model.dtype == torch.bfloat16
    assert (merged_logits - adapter_logits).abs().max() < 0.1 * (adapter_logits - base_logits).abs().max() + 0.05


def test_full_fine_tune_trains_in_float32_and_is_written_in_the_base_dtype(bf16_world: dict[str, Any],
                                                                          ft: Any) -> None:
    from llmstack.config import FinetuneConfig
    from llmstack.finetune.lora import _register_full, load_trainable

    run = ft.run_local(bf16_world, "full", bf16_world["root"] / "runs", steps=1, lr=1e-3)
    assert {p.dtype for p in run["factory"]().parameters()} == {torch.float32}  # fp32 master weights
    registry = bf16_world["registry"]
    ref = _register_full(registry, FinetuneConfig(name="bf16-full"), run["factory"], load_trainable(run["checkpoint"]),
                         bf16_world["tokenizer"], bf16_world["ref"], {}, "fingerprint", {"method": "full"})
    assert registry.manifest(ref).extra["dtype"] == "bfloat16"
    assert _safetensors_dtypes(registry.fetch(ref)) == {"BF16"}


def test_a_dtype_the_machine_cannot_compute_in_is_refused_by_name(bf16_world: dict[str, Any],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from llmstack.models import artifact

    monkeypatch.setattr(artifact, "_DTYPE_PROBLEMS", {("bfloat16", "cpu"): "RuntimeError: no bf16 kernel"})
    with pytest.raises(ModelLoadError, match=r"dtype bfloat16 \(bf16@v1's stored dtype\) cannot run on cpu here: "
                                             r"RuntimeError: no bf16 kernel; ask for another dtype"):
        load_artifact(bf16_world["ref"], registry=bf16_world["registry"])
    assert load_artifact(bf16_world["ref"], registry=bf16_world["registry"], dtype="float32").model.dtype == \
        torch.float32
    assert artifact._dtype_problem("float32", "cpu") is None  # the real probe, on this machine
