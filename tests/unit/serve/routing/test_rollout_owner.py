"""A canary's owner on the routing board, without Ray: an app whose candidate fails the gate starts, serves
stable, and says why; admin calls raise llmstack errors."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from llmstack.config import ServeConfig, to_dict
from llmstack.errors import ValidationFailedError
from llmstack.registry import Registry
from llmstack.serve.routing.canary_config import CanaryConfig, CanaryError
from llmstack.serve.routing.rollout import CanaryScope

from .conftest import two_versions


@pytest.fixture
def gated_registry(tmp_path: Path) -> Registry:
    """tiny-lm@v1 (production) and tiny-lm@v2, whose validation against v1 failed."""
    return two_versions(tmp_path, v2_passed=False)


def router_spec(registry: Registry, *, start: bool) -> dict[str, Any]:
    serve_cfg = ServeConfig(model="tiny-lm@v1", registry=registry.url, app_name="canary-unit")
    versions = [{"name": n, "ref": n, "serve": to_dict(serve_cfg), "deployment": f"LLMServer-{n}",
                 "deployment_class": None, "deployment_args": {}, "app": "canary-unit"}
                for n in ("tiny-lm@v1", "tiny-lm@v2")]
    return {"serve": to_dict(serve_cfg), "canary": to_dict(CanaryConfig(candidate="tiny-lm@v2", start=start)),
            "stable": "tiny-lm@v1", "candidate": "tiny-lm@v2", "weights": {"tiny-lm@v1": 100.0},
            "versions": versions}


async def settled(scope: str, epoch: int) -> bool:
    return True  # no ingress replicas here to wait for


async def new_router(spec: dict[str, Any]) -> CanaryScope:
    scope = {k: v for k, v in spec.items() if k != "serve"}
    router = CanaryScope("", scope, serve=spec["serve"], app_name="canary-unit", settled=settled)
    await router.begin()
    return router


def test_start_true_with_a_candidate_failing_the_gate_serves_stable(gated_registry: Registry) -> None:
    import ray

    ray_was_running = ray.is_initialized()  # the full suite's shared cluster may already be up

    async def main() -> dict[str, Any]:
        router = await new_router(router_spec(gated_registry, start=True))
        return await router.status()

    status = asyncio.run(main())  # crash-looped with a TypeError before (a `kind` key collided in _event)
    assert status["weights"] == {"tiny-lm@v1": 100.0} and status["canary"] is None and not status["running"]
    refused = [e for e in status["events"] if e["event"] == "start_refused"]
    assert refused and refused[0]["error"] == "ValidationFailedError" and "perplexity" in refused[0]["message"]
    assert status["app"] == "canary-unit" and status["serve"]["http"]["api_key"] is None
    # a status outside a cluster asks nothing of Ray (it started a local one before)
    assert ray.is_initialized() == ray_was_running


def test_admin_calls_raise_llmstack_errors(gated_registry: Registry) -> None:
    async def main() -> None:
        router = await new_router(router_spec(gated_registry, start=False))
        with pytest.raises(ValidationFailedError, match="its validation against it failed: perplexity"):
            await router.start("tiny-lm@v2")
        with pytest.raises(CanaryError, match="already the stable version"):
            await router.start("tiny-lm@v1")
        with pytest.raises(CanaryError, match="no canary is running"):
            await router.abort_canary()
        forced = await router.start("tiny-lm@v2", force=True, plan={"steps": [20, 100], "hold_s": 5})
        assert forced["status"]["weights"] == {"tiny-lm@v2": 20.0, "tiny-lm@v1": 80.0}
        with pytest.raises(CanaryError, match="already running"):
            await router.start("tiny-lm@v2", force=True)
        aborted = await router.abort_canary(reason="test")
        assert aborted["status"]["weights"] == {"tiny-lm@v1": 100.0}
        assert aborted["status"]["history"][-1]["state"] == "aborted"

    asyncio.run(main())
