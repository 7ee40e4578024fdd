"""The predictive policy driven through the simulator: ramps, bursts, idle periods, flapping input."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest

from llmstack.autoscale.policy import MODE_FALLBACK, LoadCounters, PredictivePolicy, parse_prometheus_counters
from llmstack.autoscale.simulator import ReplicaModel, ServeDelays, SimContext, simulate
from llmstack.autoscale.trace import Trace, synthetic_trace
from llmstack.config import PredictiveScalingConfig, ReplicaAutoscalingConfig, to_dict

# ~20 requests/s of 200-token prompts per replica; a replica starts in 3 s.
MODEL = ReplicaModel(prefill_tokens_per_s=4000.0, decode_step_s=0.002, decode_step_per_seq_s=0.0003,
                     startup_s=3.0, prefill_overhead_s=0.002, request_overhead_s=0.01)
COMMON = dict(min_replicas=1, max_replicas=6, target_ongoing_requests=4,
              upscale_delay_s=2.0, downscale_delay_s=10.0, look_back_period_s=10.0)
PREDICTIVE = ReplicaAutoscalingConfig(**COMMON, policy="predictive", predictive=PredictiveScalingConfig(
    ttft_slo_s=1.0, capacity_tokens_per_s=3000.0, headroom=0.2, forecast_bin_s=1.0, forecast_horizon_s=5.0,
    downscale_stable_s=15.0, downscale_cooldown_s=10.0))
REACTIVE = ReplicaAutoscalingConfig(**COMMON)


def _forecast(auto: ReplicaAutoscalingConfig, **changes: object) -> ReplicaAutoscalingConfig:
    """``auto`` with ``changes`` to its predictive section."""
    return dataclasses.replace(auto, predictive=dataclasses.replace(auto.predictive, **changes))


def _first_scale_up(result) -> float:
    timeline = result.timeline
    return next(t for t, n in zip(timeline["time"], timeline["target"]) if n > 1)


def _with_tail(trace: Trace, at: float) -> Trace:
    """Append one request at ``at`` so the simulation runs (idle) until then."""
    return Trace([*trace.arrival_s, at], [*trace.context_tokens, 200], [*trace.generated_tokens, 16])


def test_ramp_is_met_ahead_of_the_queue() -> None:
    segments = [(30, 2.0)] + [(8, r) for r in (6, 10, 14, 18, 22, 26, 30, 34)] + [(30, 34.0)]
    trace = synthetic_trace(segments, context_tokens=200, generated_tokens=16, seed=1)
    predictive = simulate(trace, PREDICTIVE, policy="predictive", replica_model=MODEL)
    reactive = simulate(trace, REACTIVE, policy="reactive", replica_model=MODEL)
    assert predictive.metrics["predicted_ramps"] >= 1
    assert _first_scale_up(predictive) < _first_scale_up(reactive)
    # In the second before its first scale-up the queue had not built: one replica held fewer requests
    # than target_ongoing_requests (while the reactive run later sat far above it).
    index = predictive.timeline["time"].index(_first_scale_up(predictive)) - 1
    assert predictive.timeline["ongoing"][index] < PREDICTIVE.target_ongoing_requests
    assert max(reactive.timeline["ongoing"]) > 3 * PREDICTIVE.target_ongoing_requests
    assert predictive.metrics["slo_misses"] < reactive.metrics["slo_misses"]


def test_burst_is_absorbed_better_than_reactive_and_held_through_the_stable_window() -> None:
    trace = synthetic_trace([(40, 2.0), (10, 45.0), (60, 2.0)], context_tokens=200, generated_tokens=16, seed=2)
    predictive = simulate(trace, PREDICTIVE, policy="predictive", replica_model=MODEL)
    reactive = simulate(trace, REACTIVE, policy="reactive", replica_model=MODEL)
    assert predictive.metrics["slo_attainment"] > reactive.metrics["slo_attainment"]
    timeline = predictive.timeline
    peak = max(timeline["target"])
    assert peak >= 3
    # No scale-down before the lower load has held for downscale_stable_s after the burst (ends at ~50 s).
    before = [n for t, n in zip(timeline["time"], timeline["target"])
              if 50 <= t <= 50 + PREDICTIVE.predictive.downscale_stable_s]
    assert min(before) == peak


def test_idle_period_returns_to_min_replicas_only_after_the_stable_drop() -> None:
    busy = synthetic_trace([(30, 30.0)], context_tokens=200, generated_tokens=16, seed=3)
    result = simulate(_with_tail(busy, 150.0), PREDICTIVE, policy="predictive", replica_model=MODEL)
    timeline = result.timeline
    assert max(timeline["target"]) >= 2
    last_busy = busy.arrival_s[-1]
    early = [n for t, n in zip(timeline["time"], timeline["target"]) if last_busy < t < last_busy + 10]
    assert min(early) >= 2
    assert timeline["target"][-1] == PREDICTIVE.min_replicas
    assert result.metrics["idle_replica_seconds"] < result.metrics["replica_seconds"]


def test_flapping_input_does_not_flap_the_replicas() -> None:
    segments = [(4, 22.0) if i % 2 == 0 else (4, 4.0) for i in range(40)]
    trace = synthetic_trace(segments, context_tokens=200, generated_tokens=16, seed=4)
    nervous = ReplicaAutoscalingConfig(**{**COMMON, "upscale_delay_s": 0.0, "downscale_delay_s": 0.0,
                                   "look_back_period_s": 2.0})
    predictive = simulate(trace, PREDICTIVE, policy="predictive", replica_model=MODEL)
    reactive = simulate(trace, nervous, policy="reactive", replica_model=MODEL)
    assert predictive.metrics["scale_events"] <= 4
    assert reactive.metrics["scale_events"] > 2 * predictive.metrics["scale_events"]


def test_no_history_falls_back_to_the_queue_rule_and_says_so() -> None:
    policy = PredictivePolicy(**{**COMMON, "policy": "predictive"})
    ctx = SimContext(deployment_name="d", current_num_replicas=1, target_num_replicas=1, total_num_requests=9.0,
                     total_queued_requests=0.0, capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=6,
                     policy_state={}, current_time=100.0, config=None, load_counters=None)
    replicas, state = policy(ctx)
    assert replicas == math.ceil(9.0 / COMMON["target_ongoing_requests"])
    assert state["mode"] == MODE_FALLBACK and state["fallback_ticks"] == 1
    trace = synthetic_trace([(20, 3.0)], context_tokens=200, generated_tokens=16, seed=5)
    metrics = simulate(trace, PREDICTIVE, policy="predictive", replica_model=MODEL).metrics
    assert metrics["forecast_fallback"] is True and metrics["fallback_ticks"] >= 1


def test_forecast_mode_after_history() -> None:
    policy = PredictivePolicy(**to_dict(PREDICTIVE))
    state: dict = {}
    for second in range(6):
        ctx = SimContext(deployment_name="d", current_num_replicas=1, target_num_replicas=1, total_num_requests=1.0,
                         total_queued_requests=0.0, capacity_adjusted_min_replicas=1,
                         capacity_adjusted_max_replicas=6, policy_state={}, current_time=float(second), config=None,
                         load_counters=LoadCounters(float(second), 10.0 * second, 3000.0 * second))
        replicas, state = policy(ctx)
    assert state["mode"] == "predictive"
    assert replicas == math.ceil(3000.0 * 1.2 / 3000.0)  # demand 1.2 replicas, no trend


def test_simulation_is_deterministic_and_static_never_scales() -> None:
    trace = synthetic_trace([(30, 5.0), (10, 20.0)], context_tokens=200, generated_tokens=16, seed=6)
    a = simulate(trace, PREDICTIVE, policy="predictive", replica_model=MODEL).metrics
    b = simulate(trace, PREDICTIVE, policy="predictive", replica_model=MODEL).metrics
    assert a == b
    static = simulate(trace, REACTIVE, policy="static", static_replicas=3, replica_model=MODEL).metrics
    assert static["scale_events"] == 0
    assert static["replica_seconds"] == pytest.approx(3 * static["duration_s"], abs=0.01)


def test_serve_delay_rule_matches_rays_own() -> None:
    from ray.serve._private.constants import (SERVE_AUTOSCALING_DECISION_COUNTERS_KEY,
                                              SERVE_AUTOSCALING_DECISION_TIMESTAMP_KEY)
    from ray.serve.autoscaling_policy import _apply_delay_logic
    from ray.serve.config import AutoscalingConfig as RayConfig

    config = RayConfig(min_replicas=0, max_replicas=10, upscale_delay_s=2.0, downscale_delay_s=5.0,
                       downscale_to_zero_delay_s=8.0)
    ours = ServeDelays(2.0, 5.0, 8.0)
    rng = random.Random(0)
    state: dict = {}
    target_ray = target_ours = 3
    for tick in range(3000):
        now = tick * 0.1
        desired = max(0, min(10, target_ray + rng.choice([-2, -1, 0, 0, 0, 1, 2])))
        target_ray, state = _apply_delay_logic(desired, target_ray, config, state, _now=now)
        target_ours = ours.apply(desired, target_ours, now)
        assert target_ray == target_ours, tick
    assert SERVE_AUTOSCALING_DECISION_COUNTERS_KEY in state and SERVE_AUTOSCALING_DECISION_TIMESTAMP_KEY in state


def test_prometheus_counters_sum_every_label_set() -> None:
    text = ("# HELP x\nllmstack_request_latency_seconds_count{route=\"a\",model=\"m\"} 4.0\n"
            "llmstack_request_latency_seconds_count{route=\"b\",model=\"m\"} 1.0\n"
            "llmstack_request_latency_seconds_sum{route=\"b\",model=\"m\"} 9.0\n"
            "llmstack_requests_in_flight{model=\"m\"} 2.0\nllmstack_prompt_tokens_total{model=\"m\"} 100.0\n"
            "llmstack_completion_tokens_total{model=\"m\"} 20.0\nllmstack_requests_created 9.0\n")
    counters = parse_prometheus_counters(text, 5.0)
    assert (counters.requests, counters.tokens, counters.completed, counters.time) == (7.0, 120.0, 5.0, 5.0)


def test_utilisation_is_busy_time_over_replica_time_by_hand() -> None:
    # One request on one static replica: a prefill pass, then output - 1 decode steps at batch 1.
    model = ReplicaModel(prefill_tokens_per_s=1000.0, decode_step_s=0.01, decode_step_per_seq_s=0.0, startup_s=1.0,
                         prefill_overhead_s=0.05)
    trace = Trace([0.0, 10.0], [500, 500], [11, 11])
    auto = ReplicaAutoscalingConfig(max_replicas=2, predictive=PredictiveScalingConfig(capacity_tokens_per_s=100.0))
    m = simulate(trace, auto, policy="static", static_replicas=2, replica_model=model).metrics
    busy_per_request = 0.05 + 500 / 1000.0 + 10 * 0.01  # 0.65 s
    end = 10.0 + busy_per_request
    assert m["duration_s"] == pytest.approx(end)
    assert m["replica_seconds"] == pytest.approx(2 * end)
    assert m["idle_replica_seconds"] == pytest.approx(2 * end - 2 * busy_per_request)
    assert m["utilization"] == pytest.approx(2 * busy_per_request / (2 * end), abs=1e-4)
    assert m["tokens_served"] == 2 * 511
    assert m["capacity_utilization"] == pytest.approx(2 * 511 / (100.0 * 2 * end), abs=1e-4)


def test_scaled_replica_is_slower_by_the_scale_and_keeps_its_limits() -> None:
    slow = MODEL.scaled(0.25, startup_s=9.0)
    assert slow.prefill_tokens_per_s == pytest.approx(1000.0)
    assert slow.decode_step_s == pytest.approx(0.008) and slow.prefill_overhead_s == pytest.approx(0.008)
    assert (slow.startup_s, slow.max_batch_size, slow.request_overhead_s) == (9.0, MODEL.max_batch_size, 0.01)
    assert MODEL.scaled(1.0) == MODEL
    from llmstack.errors import ConfigError

    with pytest.raises(ConfigError, match="capacity_scale"):
        MODEL.scaled(0.0)
    # The same trace keeps a slower fleet busier.
    trace = synthetic_trace([(30, 5.0)], context_tokens=200, generated_tokens=16, seed=7)
    fast = simulate(trace, REACTIVE, policy="static", static_replicas=2, replica_model=MODEL).metrics
    slower = simulate(trace, REACTIVE, policy="static", static_replicas=2, replica_model=MODEL.scaled(0.5)).metrics
    assert slower["utilization"] > 1.5 * fast["utilization"]


def test_a_custom_policy_callable_runs_under_serves_delays() -> None:
    calls = []

    def always_three(ctx):
        calls.append(ctx.current_time)
        return 3, {}

    always_three.name = "three"
    trace = synthetic_trace([(20, 2.0)], context_tokens=200, generated_tokens=16, seed=8)
    result = simulate(trace, REACTIVE, policy=always_three, replica_model=MODEL)
    assert result.policy == "three" and result.metrics["policy"] == "three"
    assert calls and result.metrics["peak_replicas"] == 3
    first = next(t for t, n in zip(result.timeline["time"], result.timeline["target"]) if n == 3)
    assert first >= REACTIVE.upscale_delay_s  # Serve's upscale delay applies to it


def test_reserve_keeps_the_recent_demand_quantile_through_a_gap() -> None:
    # Bursts of ~4 replicas of demand every 60 s with idle gaps: the reserve holds capacity through the gaps.
    segments = []
    for _ in range(4):
        segments += [(10, 60.0), (50, 0.0)]
    trace = synthetic_trace(segments, context_tokens=200, generated_tokens=16, seed=9)
    base = _forecast(PREDICTIVE, downscale_stable_s=5.0, downscale_cooldown_s=5.0)
    reserve = _forecast(base, reserve_window_s=120.0, reserve_quantile=0.9)
    plain = simulate(trace, base, policy="predictive", replica_model=MODEL)
    held = simulate(trace, reserve, policy="predictive", replica_model=MODEL)

    def gap_min(result, start: float, stop: float) -> int:
        return min(n for t, n in zip(result.timeline["time"], result.timeline["target"]) if start <= t <= stop)

    # In the third gap (130-180 s) the plain policy went back to min_replicas, the reserve kept more.
    assert gap_min(plain, 150, 175) == base.min_replicas
    assert gap_min(held, 150, 175) >= 2
    assert held.metrics["slo_misses"] <= plain.metrics["slo_misses"]
    assert held.metrics["replica_seconds"] > plain.metrics["replica_seconds"]


def test_queued_backlog_counts_only_requests_waiting_at_handles() -> None:
    def ctx(total: float, queued: float) -> SimContext:
        return SimContext(deployment_name="d", current_num_replicas=1, target_num_replicas=1, total_num_requests=total,
                          total_queued_requests=queued, capacity_adjusted_min_replicas=1,
                          capacity_adjusted_max_replicas=6, policy_state={}, current_time=3.0, config=None,
                          load_counters=LoadCounters(3.0, 3.0, 300.0))

    for source, expected in (("ongoing", (20.0 - 4.0) / 4.0), ("queued", 8.0 / 4.0)):
        policy = PredictivePolicy(**to_dict(_forecast(PREDICTIVE, backlog_source=source)))
        for second in range(3):  # two bins of (near-idle) history
            policy(SimContext(deployment_name="d", current_num_replicas=1, target_num_replicas=1,
                              total_num_requests=0.0, total_queued_requests=0.0, capacity_adjusted_min_replicas=1,
                              capacity_adjusted_max_replicas=6, policy_state={}, current_time=float(second),
                              config=None, load_counters=LoadCounters(float(second), float(second),
                                                                      100.0 * second)))
        _, state = policy(ctx(20.0, 8.0))
        assert state["mode"] == "predictive"
        assert state["backlog_replicas"] == pytest.approx(expected), source


def test_scale_ups_match_known_gradual_ramps_better_than_reactive() -> None:
    from llmstack.autoscale.transitions import detect_ramps, scale_up_times, score_transitions

    climb = [(2, 2.0 + 2.0 * i) for i in range(16)]  # 2 -> 32 requests/s over 32 s
    segments = [(30, 2.0)] + climb + [(30, 34.0), (60, 2.0)] + climb + [(30, 34.0), (30, 2.0)]
    trace = synthetic_trace(segments, context_tokens=200, generated_tokens=16, seed=11)
    predictive = simulate(trace, PREDICTIVE, policy="predictive", replica_model=MODEL)
    reactive = simulate(trace, REACTIVE, policy="reactive", replica_model=MODEL)
    capacity = PREDICTIVE.predictive.capacity_tokens_per_s
    ramps = detect_ramps(predictive.timeline["tokens"], capacity_tokens_per_s=capacity, smooth_s=3, rise_s=10, floor=1)
    assert ramps == detect_ramps(reactive.timeline["tokens"], capacity_tokens_per_s=capacity,
                                 smooth_s=3, rise_s=10, floor=1)  # the same load
    assert any(40 <= r <= 50 for r in ramps) and any(160 <= r <= 170 for r in ramps)  # both climbs
    window = {"max_lead_s": PREDICTIVE.predictive.forecast_horizon_s, "late_s": 1.0}
    ours = score_transitions(ramps, scale_up_times(predictive.timeline), **window)
    theirs = score_transitions(ramps, scale_up_times(reactive.timeline), **window)
    assert ours["recall"] > theirs["recall"] and ours["precision"] > theirs["precision"]
    assert ours["ahead"] >= 2
