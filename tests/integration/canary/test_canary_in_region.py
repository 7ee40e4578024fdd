"""A canary inside one region of a multi-region app, on the session's Ray cluster over real HTTP.

The app is serve_configs/canary-in-region.yaml's, with what this cluster needs: both regions on its one node
(marked by the head's own ``node:__internal_head__`` resource), this session's registry and port, and a plan
short enough for a test. eu-west splits between tiny-lm@v1 (stable) and tiny-lm@v2 (candidate); us-east
serves v1, untouched; the board promotes the candidate when the plan ends clean (the registry alias moves).
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import requests
from canary_helpers import VERSION_HEADER, Load, wait_healthy

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[3]
V1, V2 = "tiny-lm@v1", "tiny-lm@v2"
REGION_HEADER = "x-llmstack-region"
HEAD = "node:__internal_head__"  # a custom resource every Ray head holds: both regions on this one node


def app_args(registry_url: str) -> dict[str, Any]:
    """The shipped file's app args, fitted to this cluster and made quick."""
    from llmstack.config import to_dict
    from llmstack.serve.regions import load_regions_config

    cfg, serve_cfg = load_regions_config(str(ROOT / "serve_configs" / "canary-in-region.yaml"))
    regions = to_dict(cfg.regions)
    for region in regions.values():
        region["resource"] = HEAD
        region["latency_ms"] = 0
    canary = regions["eu-west"]["canary"]
    for key in ("stable", "router_replicas"):  # a region's canary takes these from the app
        canary.pop(key)
    # A 20% first step held for 5 candidate requests: the stable version surely answers some of the load meanwhile
    # (no V1 answer at all has odds 0.2^5; at 50% and 3 requests it was 1 in 8, and a busy run met it).
    canary.update(candidate=V2, plan={"steps": [20, 100], "hold_s": 2.0, "min_requests": 5},
                  # a healthy candidate on a busy 2-core machine: only a slowdown past 2 s counts
                  thresholds={"window_s": 30, "latency_floor_s": 2.0})
    serve = {k: v for k, v in to_dict(serve_cfg).items() if k != "model"}
    serve["engine"].update(max_batch_size=8, batch_wait_timeout_s=0.005, default_max_tokens=8, max_tokens_limit=64,
                           response_cache_size=0)
    serve["deployment"]["ray_actor_options"] = {"num_cpus": 0.25}
    return {**serve, "model": "tiny-lm@production", "regions": regions, "routing": to_dict(cfg.routing)}


@pytest.fixture(scope="module")
def region_canary_app(ray_cluster: dict, canary_registry: dict[str, Any]) -> Any:
    from llmstack.serve._testing import serve_http_port
    from llmstack.serve.regions import deploy_regions

    dep = deploy_regions({**app_args(canary_registry["url"]), "registry": canary_registry["url"],
                          "app_name": "canary-region-it",
                          "http": {"route_prefix": "/canary-region-it", "port": serve_http_port(),
                                   "host": "127.0.0.1"}})
    wait_healthy(dep.url)
    yield dep
    dep.shutdown()


def test_the_region_splits_the_other_is_untouched_and_the_canary_is_promoted(
        region_canary_app: Any, canary_registry: dict[str, Any]) -> None:
    from llmstack.serve.canary import canary_status

    registry = canary_registry["registry"]
    app = region_canary_app
    status = canary_status(app_name=app.app_name, region="eu-west")
    assert status["region"] == "eu-west" and status["stable"] == V1 and set(status["versions"]) == {V1, V2}
    assert status["versions"][V2]["deployment"] == "LLMServer-eu-west--tiny-lm-v2"

    seen: list[tuple[str | None, str | None, int]] = []
    with Load(app.url, threads=3) as load:
        deadline = time.time() + 90
        while time.time() < deadline:
            status = canary_status(app_name=app.app_name, region="eu-west")
            if status["canary"] is not None and status["canary"]["state"] != "running":
                break
            time.sleep(0.5)
        time.sleep(1.0)
        for _ in range(8):  # after the plan: sticky sessions are not needed to see where answers come from
            r = requests.post(app.url + "/v1/completions", json={"prompt": "line 1:", "max_tokens": 4}, timeout=60)
            seen.append((r.headers.get(REGION_HEADER), r.headers.get(VERSION_HEADER), r.status_code))

    c = status["canary"]
    assert c is not None and c["state"] == "promoted", c
    assert registry.aliases("tiny-lm")["production"] == 2  # the board moved the alias (Registry.promote)
    assert status["stable"] == V2 and status["weights"] == {V2: 100.0}
    # Every request answered: during the plan eu-west answered from both versions, us-east from its own
    # deployment only (no version header), and after the promotion eu-west answers from the candidate.
    assert load.samples and not load.failed(), load.failed()[:3]
    versions = Counter(sample.version for sample in load.samples)
    assert versions[None] > 0 and versions[V1] > 0 and versions[V2] > 0, versions
    assert set(versions) == {None, V1, V2}, versions
    for region, version, code in seen:
        assert code == 200 and region in ("us-east", "eu-west")
        assert version is None if region == "us-east" else version == V2, (region, version)
    from ray import serve

    deployments = set(serve.status().applications[app.app_name].deployments)
    assert {"LLMServer-us-east", "LLMServer-eu-west", "LLMServer-eu-west--tiny-lm-v2"} <= deployments
    assert not any(name.startswith("LLMServer-us-east--") for name in deployments)  # us-east: no canary
    region_status = requests.get(app.url + "/regions", timeout=10).json()
    assert region_status["regions"]["us-east"]["totals"]["ok"] > 0
    assert region_status["regions"]["us-east"]["healthy"] and region_status["regions"]["eu-west"]["healthy"]
    metrics = requests.get(app.url + "/metrics", timeout=10).text
    assert 'llmstack_canary_weight_percent{region="eu-west",version="tiny-lm@v2"} 100.0' in metrics


def test_every_router_of_the_region_app_follows_its_drain_board(region_canary_app: Any) -> None:
    """The last test of this module: it drains the app (the fixture then deletes it). What SIGTERM to the
    deploying process does: the board starts the drain; both router replicas refuse new requests (503 +
    Retry-After, OpenAI shape), answer /health with 503 and, having nothing live, report idle."""
    import ray

    app = region_canary_app
    assert app.ingress_replicas == 2 and app.board is not None
    ray.get(app.board.start.remote(60.0), timeout=30)
    deadline = time.time() + 30
    while ray.get(app.board.idle_replicas.remote(), timeout=30) < 2 and time.time() < deadline:
        time.sleep(0.1)
    assert ray.get(app.board.idle_replicas.remote(), timeout=30) == 2  # both routers drained
    for _ in range(4):  # whichever router the proxy picks
        refused = requests.post(app.url + "/v1/completions", json={"prompt": "x", "max_tokens": 1}, timeout=30)
        assert refused.status_code == 503 and int(refused.headers["Retry-After"]) >= 1
        assert refused.json()["error"]["code"] == "shutting_down"
    assert requests.get(app.url + "/health", timeout=30).status_code == 503
