"""Multi-region config: every bad field reported with its key path; the shipped serve file parses."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmstack.errors import ConfigError
from llmstack.serve.routing.regions_config import load_regions_config, spec_of

ROOT = Path(__file__).resolve().parents[4]


def test_defaults_and_spec() -> None:
    cfg, serve_cfg = load_regions_config({
        "model": "tiny-lm@v1", "deployment": {"ray_actor_options": {"num_cpus": 0.5}}, "regions": {
            "us-east": {"price_per_replica_hour": 2.0, "replicas": 2},
            "eu-west": {"price_per_replica_hour": 1.0, "latency_ms": 40, "resource": "zone-b"}}})
    assert cfg.routing.policy == "cost" and serve_cfg.replica_resources()["CPU"] == 0.5
    spec = spec_of(cfg, serve_cfg)
    assert spec["regions"]["us-east"]["resource"] == "region:us-east"
    assert spec["regions"]["eu-west"]["resource"] == "zone-b"
    assert spec["regions"]["us-east"]["deployment"] == "LLMServer-us-east"


def test_every_problem_at_once_with_key_paths() -> None:
    with pytest.raises(ConfigError) as info:
        load_regions_config({"engine": {"max_batch_size": 0}, "regions": {
            "us-east": {"price_per_replica_hour": 0, "replicas": 0},
            "EU West": {"price_per_replica_hour": -1, "latency_ms": -5}},
            "routing": {"policy": "cheapest", "weights": {"mars": 1}}})
    text = "\n".join(info.value.problems)
    for expected in ("regions.us-east.price_per_replica_hour: must be > 0, got 0",
                     "regions.us-east.replicas: must be >= 1",
                     "regions.EU West.price_per_replica_hour: must be > 0, got -1",
                     "regions.EU West.latency_ms: must be >= 0",
                     "routing.policy: must be one of 'cost', 'latency', 'round_robin', got 'cheapest'",
                     "engine.max_batch_size: must be >= 1"):
        assert expected in text, text


def test_unknown_region_in_weights_and_bad_names() -> None:
    with pytest.raises(ConfigError) as info:
        load_regions_config({"regions": {"us-east": {}, "EU_West": {}}, "routing": {"weights": {"mars": 1}}})
    text = "\n".join(info.value.problems)
    assert "routing.weights.mars: unknown region (known: us-east, EU_West)" in text
    assert "regions.EU_West: a region name is lowercase" in text


def test_no_regions_and_unknown_keys() -> None:
    with pytest.raises(ConfigError, match="regions: at least one region is needed"):
        load_regions_config({"regions": {}})
    with pytest.raises(ConfigError, match="routing.polcy: unknown key"):
        load_regions_config({"regions": {"us-east": {}}, "routing": {"polcy": "cost"}})


def test_shipped_serve_file_parses() -> None:
    cfg, serve_cfg = load_regions_config(str(ROOT / "serve_configs" / "multi-region.yaml"))
    assert len(cfg.regions) >= 2
    total = sum(r.replicas for r in cfg.regions.values()) * serve_cfg.replica_resources()["CPU"] + 0.1
    assert total <= 2.0, "the shipped file must fit a 2-CPU machine"


def test_a_region_may_carry_a_canary_which_takes_its_stable_version_from_the_app() -> None:
    cfg, serve_cfg = load_regions_config(str(ROOT / "serve_configs" / "canary-in-region.yaml"))
    canary = cfg.regions["eu-west"].canary
    assert canary is not None and canary.candidate == "tiny-lm@latest" and canary.plan.steps == [10, 50, 100]
    assert cfg.regions["us-east"].canary is None and serve_cfg.model == "tiny-lm@production"
    replicas = sum(r.replicas + (r.canary.version_replicas if r.canary else 0) for r in cfg.regions.values())
    assert replicas * serve_cfg.replica_resources()["CPU"] + 2 * 0.1 <= 2.0, "the shipped file must fit a 2-CPU machine"
    with pytest.raises(ConfigError) as info:
        load_regions_config({"regions": {"eu-west": {"canary": {
            "stable": "tiny-lm@v1", "router_replicas": 3, "plan": {"steps": [50, 10]}, "bogus": 1}}}})
    text = "\n".join(info.value.problems)
    for expected in ("regions.eu-west.canary.stable: a region's stable version is the app's `model`",
                     "regions.eu-west.canary.router_replicas: the app's routers serve every region",
                     "regions.eu-west.canary.plan.steps: must increase strictly",
                     "regions.eu-west.canary.bogus: unknown key"):
        assert expected in text, text
