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
