"""Artifacts of every kind, each built by the code path that really produces it, on the tiny preset.

Adapters are trained in-process by the fine-tuning tests' own helpers (the ``finetune_helpers`` fixture of
tests/unit/conftest.py), then registered the way ``finetune_lora()`` does.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def ft(finetune_helpers: Any) -> Any:
    return finetune_helpers


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory, ft: Any) -> Iterator[dict[str, Any]]:
    """A registry with the base ``base@v1`` (alias ``production``) and the data to fine-tune it on."""
    import torch

    from llmstack.finetune.data import instruction_tensors
    from llmstack.registry import Registry

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared 2-core box
    root = tmp_path_factory.mktemp("models-unit")
    cache = os.environ.get("LLMSTACK_CACHE")
    os.environ["LLMSTACK_CACHE"] = str(root / "cache")  # URL copies and registry downloads stay in the test's folder
    registry = Registry(str(root / "registry"))
    ref, tokenizer = ft.make_base(registry)
    registry.set_alias(ref.name, "production", ref)
    data = instruction_tensors(ft.QA, tokenizer, max_length=ft.BLOCK, max_rows=32)
    yield {"registry": registry, "ref": ref, "tokenizer": tokenizer, "data": data, "root": Path(root)}
    torch.set_num_threads(threads)
    if cache is None:
        os.environ.pop("LLMSTACK_CACHE", None)
    else:
        os.environ["LLMSTACK_CACHE"] = cache


@pytest.fixture(scope="session")
def runs(world: dict[str, Any], ft: Any, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], dict[str, Any]]:
    """``runs(method)``: a 3-step in-process fine-tuning run of ``method`` (once per session)."""
    cache: dict[str, dict[str, Any]] = {}
    root = tmp_path_factory.mktemp("models-runs")

    def get(method: str) -> dict[str, Any]:
        if method not in cache:
            cache[method] = ft.run_local(world, method, root, steps=3, lr=1e-2 if method == "bitfit" else 3e-3)
        return cache[method]

    return get


@pytest.fixture(scope="session")
def adapter_refs(world: dict[str, Any], runs: Callable[[str], dict[str, Any]], ft: Any) -> Callable[[str], Any]:
    """``adapter_refs(method)``: that run registered as adapter ``ad-<method>@v1``."""
    cache: dict[str, Any] = {}

    def get(method: str) -> Any:
        if method not in cache:
            cache[method] = ft.register(world, runs(method), f"ad-{method}")
        return cache[method]

    return get


def trained_model(run: dict[str, Any]) -> Any:
    """The model exactly as the fine-tuning loop left it (its factory plus the final trainable tensors)."""
    from llmstack.finetune.lora import load_trainable

    model = run["factory"]()
    model.load_state_dict(load_trainable(run["checkpoint"]), strict=False)
    return model.eval()


def logits(model: Any, world: dict[str, Any]) -> Any:
    import torch

    with torch.no_grad():
        return model(input_ids=world["data"].eval["input_ids"][:2],
                     attention_mask=world["data"].eval["attention_mask"][:2]).logits


@pytest.fixture(scope="session")
def helpers() -> Any:
    return sys.modules[__name__]
