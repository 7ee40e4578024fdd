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
