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


@pytest.fixture(scope="session")
def architecture_tokenizer() -> Any:
    """A small byte-level BPE (with a chat template) trained on the built-in corpus, shared by the tiny models."""
    from llmstack.data import load_corpus, trained_tokenizer

    return trained_tokenizer(load_corpus("builtin:stdlib", max_documents=60), vocab_size=512)


@pytest.fixture(scope="session")
def architecture_dir(tmp_path_factory: pytest.TempPathFactory, architecture_tokenizer: Any) -> Any:
    """``architecture_dir(arch, max_positions=128)``: a Hugging Face directory (weights + tokenizer) of a tiny
    random-init ``arch`` model (:func:`llmstack.serve._testing.tiny_causal_lm`), as a user's downloaded
    checkpoint would be; built once per arguments."""
    from llmstack.serve._testing import tiny_causal_lm

    built: dict[tuple[str, int], Path] = {}

    def make(architecture: str, max_positions: int = 128) -> Path:
        key = (architecture, max_positions)
        if key not in built:
            directory = tmp_path_factory.mktemp(f"hf-{architecture}")
            # Qwen2's embedding matrix is padded beyond the tokenizer, as released checkpoints are (transformers
            # also gives a Qwen2 directory's tokenizer an <|endoftext|> unk token when it has none).
            model = tiny_causal_lm(architecture, architecture_tokenizer, max_positions=max_positions,
                                   padded_vocab=architecture == "qwen2")
            model.save_pretrained(directory)
            architecture_tokenizer.save_pretrained(directory)
            built[key] = directory
        return built[key]

    return make
