"""A tiny random-init model and tokenizer, shared by the engine and API unit tests (no Ray)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # engine_helpers, shared by the test modules here


@pytest.fixture(scope="session")
def tiny() -> tuple[Any, Any]:
    from llmstack.serve._testing import tiny_model

    return tiny_model(seed=0)


@pytest.fixture(scope="session")
def adapter_dirs(tiny: tuple[Any, Any], tmp_path_factory: pytest.TempPathFactory) -> list[Any]:
    from llmstack.serve._testing import lora_adapter

    root = tmp_path_factory.mktemp("adapters")
    return [lora_adapter(tiny[0], root / f"lora-{i}", seed=i) for i in range(2)]


@pytest.fixture
def engine(tiny: tuple[Any, Any], adapter_dirs: list[Any]) -> Any:
    from llmstack.serve.engine import AdapterSpec, ServedModel, TransformersEngine
    from llmstack.serve.engine.loading import dir_identity

    model, tokenizer = tiny
    adapters = [AdapterSpec(f"lora-{i}", str(d), dir_identity(d)) for i, d in enumerate(adapter_dirs)]
    # A fresh copy of the model per test: adapters wrap the model in place.
    import copy

    engine = TransformersEngine(ServedModel(copy.deepcopy(model), tokenizer, "tiny", "tiny@v1", "test::tiny@v1"),
                                adapters=adapters, max_tokens_limit=64, cache_size=0)
    yield engine
    engine.shutdown()
