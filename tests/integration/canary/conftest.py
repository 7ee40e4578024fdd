"""Canary fixtures: tiny-lm v1 (production), v2 (passing validation report), v3 (failing report), one canary app."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # canary_helpers and faults, shared by the test modules here

import faults  # noqa: E402  (TEST-ONLY fault injection; pickled by value: Ray workers cannot import tests/)
import ray.cloudpickle  # noqa: E402

ray.cloudpickle.register_pickle_by_value(faults)

# The "broken" version: tiny-lm@v3 on a deployment that misbehaves on purpose (its fault is switched by tests).
BROKEN = {"name": "broken", "model": "tiny-lm@v3", "deployment": "faults:FaultInjectingLLMServer",
          "deployment_args": {"fault": "raise", "delay_s": 2.0}}


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
    """stable tiny-lm@v1 (production), candidate tiny-lm@v2, and "broken": tiny-lm@v3 with test-only faults."""
    from llmstack.serve._testing import serve_http_port
    from llmstack.serve.canary import deploy_canary

    dep = deploy_canary({
        "stable": "tiny-lm@production", "candidate": "tiny-lm@v2", "registry": canary_registry["url"],
        # TEST-ONLY fault injection: one broken twin whose fault the tests switch (raise / garbage / slow).
        "versions": [BROKEN],
        "app_name": "canary-it", "http": {"route_prefix": "/canary-it", "port": serve_http_port(), "host": "127.0.0.1"},
        "engine": {"max_batch_size": 8, "batch_wait_timeout_s": 0.005, "response_cache_size": 0,
                   "default_max_tokens": 8, "max_tokens_limit": 64},
        "deployment": {"max_ongoing_requests": 32, "max_queued_requests": -1, "ray_actor_options": {"num_cpus": 0.25}},
        "thresholds": {"window_s": 30}})
    from canary_helpers import wait_healthy

    wait_healthy(dep.url)
    _warm_up(dep.app_name, ["LLMServer-tiny-lm-v1", "LLMServer-tiny-lm-v2", "LLMServer-broken"])
    yield dep
    dep.shutdown()


def _warm_up(app_name: str, deployments: list[str]) -> None:
    """One generation per version (the first forward pass of a replica is slow), faults off meanwhile."""
    from ray import serve

    from llmstack.serve.protocol import GenerationRequest, SamplingParams

    broken = serve.get_deployment_handle("LLMServer-broken", app_name=app_name)
    broken.set_fault.remote(None).result()
    for name in deployments:
        handle = serve.get_deployment_handle(name, app_name=app_name)
        for _ in range(2):
            handle.generate.remote(GenerationRequest(model="tiny-lm", prompt="line 1:",
                                                     sampling=SamplingParams(max_tokens=8))).result()
    broken.set_fault.remote("raise").result()
