from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmstack.autoscale import ReplayError, replay, serve_autoscaling_config, synthetic_trace
from llmstack.cli import main
from llmstack.config import PredictiveScalingConfig, ReplicaAutoscalingConfig, ServeConfig, load_config
from llmstack.errors import ConfigError

INLINE_KEYS = {"min_replicas", "initial_replicas", "max_replicas", "target_ongoing_requests", "upscale_delay_s",
               "downscale_delay_s", "look_back_period_s", "metrics_interval_s"}


def test_reactive_dict_is_servers_default_and_predictive_plugs_the_class_in() -> None:
    from ray.serve.config import AutoscalingConfig as RayConfig

    reactive = serve_autoscaling_config(ReplicaAutoscalingConfig(max_replicas=3))
    assert set(reactive) == INLINE_KEYS
    assert RayConfig(**reactive).policy.is_default_policy_function()
    predictive = serve_autoscaling_config(ReplicaAutoscalingConfig(
        max_replicas=3, policy="predictive", predictive=PredictiveScalingConfig(headroom=0.5)))
    assert set(predictive) == INLINE_KEYS | {"policy"}
    assert predictive["upscale_delay_s"] == predictive["downscale_delay_s"] == 0.0
    ray_config = RayConfig(**predictive)  # Serve validates and cloudpickles the policy class
    assert ray_config.policy.policy_function == "llmstack.autoscale.policy:PredictivePolicy"
    assert ray_config.policy.policy_kwargs["predictive"]["headroom"] == 0.5


def test_a_policy_that_cannot_meet_its_own_bounds_lists_every_problem_with_its_path() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(ServeConfig, {"autoscaling": {"policy": "predictive", "min_replicas": 2, "max_replicas": 2,
                                                  "predictive": {"headroom": -1, "forecast_horizon_s": 0.5,
                                                                 "forecast_bin_s": 1.0}}})
    text = str(info.value)
    assert "autoscaling.max_replicas: policy predictive cannot scale between min_replicas (2)" in text
    assert "autoscaling.predictive.headroom: must be >= 0" in text
    assert "autoscaling.predictive.forecast_horizon_s: must be >= predictive.forecast_bin_s" in text
    with pytest.raises(ConfigError, match="autoscaling.policy: must be one of"):
        load_config(ServeConfig, {"autoscaling": {"policy": "psychic"}})


def test_replay_to_a_url_that_does_not_answer(unused_port: int) -> None:
    trace = synthetic_trace([(5, 2.0)])
    with pytest.raises(ReplayError, match=f"127.0.0.1:{unused_port} does not answer"):
        replay(trace, f"http://127.0.0.1:{unused_port}", progress=False)


def _csv(tmp_path: Path, rows: list[str]) -> Path:
    path = tmp_path / "t.csv"
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return path


def test_cli_simulate_prints_the_metrics_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [f"{i * 0.25:.2f},{200 + i % 50},{8 + i % 5}" for i in range(240)]
    code = main(["replay", str(_csv(tmp_path, rows)), "--simulate", "--policy", "predictive",
                 "--out", str(tmp_path / "out")])
    assert code == 0
    metrics = json.loads(capsys.readouterr().out)
    for key in ("replica_seconds", "idle_replica_seconds", "utilization", "slo_attainment", "scale_events"):
        assert key in metrics
    assert metrics["requests"] == 240 and metrics["policy"] == "predictive"
    assert metrics["utilization"] <= metrics["utilisation_ceiling"] == 1.0  # a steady load: no gap to idle through
    code = main(["replay", str(_csv(tmp_path, rows)), "--simulate", "--thin", "4", "--out", str(tmp_path / "t")])
    assert code == 0 and json.loads(capsys.readouterr().out)["requests"] == 60
    assert (tmp_path / "out" / "simulate-predictive.png").stat().st_size > 10_000


@pytest.mark.parametrize(("rows", "args", "fragment"), [
    (["1.0,10,-2"], ["--simulate"], "row 1: GeneratedTokens must be >= 0"),
    (["1.0,10,2"], [], "replay needs --url"),
    (["1.0,10,2"], ["--simulate", "min_replicas=3", "max_replicas=2"], "max_replicas: must be >= min_replicas"),
    (["1.0,10,2"], ["--simulate", "--thin", "0"], "keep_one_in must be an integer >= 1"),
])
def test_cli_bad_input_is_one_line_and_non_zero(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                rows: list[str], args: list[str], fragment: str) -> None:
    code = main(["replay", str(_csv(tmp_path, rows)), *args, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code != 0
    assert fragment in err and len(err.strip().splitlines()) == 1


@pytest.fixture
def unused_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_cli_simulate_capacity_scale_slows_the_replica(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [f"{i * 0.5:.2f},1000,8" for i in range(60)]
    trace = str(_csv(tmp_path, rows))
    runs = {}
    for scale in ("1", "0.25"):
        code = main(["replay", trace, "--simulate", "--policy", "static", "--static-replicas", "2",
                     "--capacity-scale", scale, "--startup-s", "3", "--out", str(tmp_path / scale)])
        assert code == 0
        runs[scale] = json.loads(capsys.readouterr().out)
    assert runs["0.25"]["utilization"] > 2 * runs["1"]["utilization"]
    assert "capacity_utilization" in runs["1"]
