"""Helpers shared across unit-test folders (the folders are not packages, so they are loaded by path)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def finetune_helpers() -> Any:
    """tests/unit/finetune/conftest.py as a module: make_base, run_local, register, QA, BLOCK.

    Other folders use it to build adapters by the very code path fine-tuning uses.
    """
    name = "llmstack_tests_finetune_helpers"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).parent / "finetune" / "conftest.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="session")
def tuned_adapters(tmp_path_factory: pytest.TempPathFactory, finetune_helpers: Any) -> dict[str, Any]:
    """A base, and a BitFit and a QLoRA adapter fine-tuned on it by the real loop (3 steps each).

    ``{"registry", "ref", "tokenizer", "data", "bitfit": {"ref", "model"}, "qlora": {...}}``; ``model`` is the
    trained model itself, the reference a loaded adapter must match. Shared by serve and validate tests.
    """
    from llmstack.finetune.data import instruction_tensors
    from llmstack.finetune.lora import load_trainable
    from llmstack.registry import Registry

    ft = finetune_helpers
    root = tmp_path_factory.mktemp("tuned-adapters")
    registry = Registry(str(root / "registry"))
    ref, tokenizer = ft.make_base(registry)
    world = {"registry": registry, "ref": ref, "tokenizer": tokenizer,
             "data": instruction_tensors(ft.QA, tokenizer, max_length=ft.BLOCK, max_rows=32)}
    for method in ("bitfit", "qlora"):
        run = ft.run_local(world, method, root / "runs", steps=3, lr=1e-2 if method == "bitfit" else 3e-3)
        trained = run["factory"]()
        trained.load_state_dict(load_trainable(run["checkpoint"]), strict=False)
        world[method] = {"ref": ft.register(world, run, f"ad-{method}"), "model": trained.eval()}
    return world


ARCHITECTURES = ("llama", "qwen2", "mistral", "gemma3", "phi3", "gpt2")


def tiny_causal_lm(architecture: str, tokenizer: Any, *, seed: int = 0, max_positions: int = 128) -> Any:
    """A 2-layer, hidden-64 random-init causal LM of ``architecture`` (one of :data:`ARCHITECTURES`).

    Gemma-3 alternates a sliding-window layer with a full one; GPT-2 has learned positions, biases,
    LayerNorms and ``Conv1D`` projections; Phi-3 fuses ``qkv_proj`` and ``gate_up_proj``.
    """
    import torch
    import transformers

    ids = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
           "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    shape = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "max_position_embeddings": max_positions, "tie_word_embeddings": False}
    configs = {
        "llama": lambda: (transformers.LlamaConfig(**shape, **ids), transformers.LlamaForCausalLM),
        # Qwen2 pads its embedding matrix beyond the tokenizer (to a multiple of 64), as released checkpoints do;
        # transformers also gives a Qwen2 directory's tokenizer an <|endoftext|> unk token when it has none.
        "qwen2": lambda: (transformers.Qwen2Config(**shape, **{**ids, "vocab_size": (len(tokenizer) // 64 + 2) * 64}),
                          transformers.Qwen2ForCausalLM),
        "mistral": lambda: (transformers.MistralConfig(**shape, **ids, sliding_window=None),
                            transformers.MistralForCausalLM),
        "gemma3": lambda: (transformers.Gemma3TextConfig(**shape, **ids, head_dim=16, sliding_window=8,
                                                         layer_types=["sliding_attention", "full_attention"]),
                           transformers.Gemma3ForCausalLM),
        "phi3": lambda: (transformers.Phi3Config(**shape, **ids), transformers.Phi3ForCausalLM),
        "gpt2": lambda: (transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=max_positions, **ids),
                         transformers.GPT2LMHeadModel),
    }
    config, cls = configs[architecture]()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    return model.eval()


@pytest.fixture(scope="session")
def architecture_tokenizer() -> Any:
    """A small byte-level BPE (with a chat template) trained on the built-in corpus, shared by the tiny models."""
    from llmstack.data import load_corpus, trained_tokenizer

    return trained_tokenizer(load_corpus("builtin:stdlib", max_documents=60), vocab_size=512)


@pytest.fixture(scope="session")
def architecture_dir(tmp_path_factory: pytest.TempPathFactory, architecture_tokenizer: Any) -> Any:
    """``architecture_dir(arch, max_positions=128)``: a Hugging Face directory (weights + tokenizer) of a tiny
    random-init ``arch`` model, as a user's downloaded checkpoint would be; built once per arguments."""
    built: dict[tuple[str, int], Path] = {}

    def make(architecture: str, max_positions: int = 128) -> Path:
        key = (architecture, max_positions)
        if key not in built:
            directory = tmp_path_factory.mktemp(f"hf-{architecture}")
            model = tiny_causal_lm(architecture, architecture_tokenizer, max_positions=max_positions)
            model.save_pretrained(directory)
            architecture_tokenizer.save_pretrained(directory)
            built[key] = directory
        return built[key]

    return make
