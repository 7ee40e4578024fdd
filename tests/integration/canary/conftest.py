"""Canary fixtures: tiny-lm v1 (production), v2 (passing validation report), v3 (failing report), one canary app."""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # canary_helpers, shared by the test modules here


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _report(passed: bool, baseline: str) -> dict[str, Any]:
    """The shape validate() stores (only the fields Registry.promote reads), so the gate can be exercised here."""
    return {"passed": passed, "baseline": baseline, "summary": "test fixture report",
            "failed_checks": [] if passed else ["perplexity"]}


@pytest.fixture(scope="session")
def canary_registry(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from llmstack.models import register_model
    from llmstack.registry import validation_key
    from llmstack.serve._testing import make_registry, tiny_model

    url = str(tmp_path_factory.mktemp("canary") / "registry")
    info = make_registry(url, adapters=0)  # tiny-lm@v1, aliased production
    registry = info["registry"]
    model, tokenizer = tiny_model(seed=1)
    v2 = register_model(registry, "tiny-lm", model, tokenizer, kind="model", parents=[info["model"]])
    registry.annotate(v2, validation_key(info["model"]), _report(True, info["model"]))
    v3 = register_model(registry, "tiny-lm", info["torch_model"], info["tokenizer"], kind="model")
    registry.annotate(v3, validation_key(info["model"]), _report(False, info["model"]))
    return {"url": url, "registry": registry, "v1": info["model"], "v2": str(v2), "v3": str(v3)}


@pytest.fixture(scope="module")
def canary_app(ray_cluster: dict, canary_registry: dict[str, Any]) -> Iterator[Any]:
    """stable tiny-lm@v1, candidate tiny-lm@v2, three test-only broken twins of v2, and tiny-lm@v3."""
    from llmstack.serve.canary import deploy_canary

    dep = deploy_canary({
        "stable": "tiny-lm@production", "candidate": "tiny-lm@v2", "registry": canary_registry["url"],
        "versions": [{"name": "broken-raise", "model": "tiny-lm@v2", "fault": "raise"},
                     {"name": "broken-garbage", "model": "tiny-lm@v2", "fault": "garbage"},
                     {"name": "broken-slow", "model": "tiny-lm@v2", "fault": "slow", "fault_delay_s": 2.0},
                     {"model": "tiny-lm@v3"}],
        "app_name": "canary-it", "route_prefix": "/canary-it", "port": _free_port(), "host": "127.0.0.1",
        "num_cpus": 0.25, "max_batch_size": 8, "batch_wait_timeout_s": 0.005, "max_ongoing_requests": 32,
        "max_queued_requests": -1, "response_cache_size": 0, "default_max_tokens": 8, "max_tokens_limit": 64,
        "thresholds": {"window_s": 30}})
    from canary_helpers import wait_healthy

    wait_healthy(dep.url)
    yield dep
    dep.shutdown()
