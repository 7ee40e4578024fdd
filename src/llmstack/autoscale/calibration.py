"""Calibrating the simulator: the load one replica sustains at the SLO.

- :func:`replica_capacity` finds, in the simulator, the token rate one replica serves within the TTFT SLO.
- A replica's measured costs come from :func:`llmstack.serve.engine.calibration.calibrate_replica_model`,
  which times an engine (serve imports this package, never the other way round).
"""

from __future__ import annotations

from llmstack.autoscale.simulator import ReplicaModel, simulate
from llmstack.autoscale.trace import Trace
from llmstack.config import PredictiveScalingConfig, ReplicaAutoscalingConfig


def replica_capacity(model: ReplicaModel, *, ttft_slo_s: float, context_tokens: list[int],
                     generated_tokens: list[int], attainment: float = 0.99, duration_s: float = 120.0,
                     seed: int = 0) -> float:
    """Tokens/s (prompt + output) one replica sustains with ``attainment`` of TTFTs within the SLO.

    Poisson arrivals whose token counts are drawn from the given mix (e.g. a trace's), bisected on the
    request rate in the simulator.

    Example:
        >>> replica_capacity(DEFAULT_REPLICA_MODEL, ttft_slo_s=1.0, context_tokens=[200], generated_tokens=[16])  # doctest: +SKIP
    """
    import random

    rng = random.Random(seed)
    pairs = list(zip(context_tokens, generated_tokens))
    mean_tokens = sum(c + g for c, g in pairs) / len(pairs)
    auto = ReplicaAutoscalingConfig(predictive=PredictiveScalingConfig(ttft_slo_s=ttft_slo_s))

    def attained(rate: float) -> bool:
        arrivals, t = [], 0.0
        while True:
            t += rng.expovariate(rate)
            if t >= duration_s:
                break
            arrivals.append(t)
        drawn = [pairs[rng.randrange(len(pairs))] for _ in arrivals]
        trace = Trace(arrivals, [c for c, _ in drawn], [g for _, g in drawn], source="<capacity>")
        result = simulate(trace, auto, policy="static", static_replicas=1, replica_model=model, drain_s=30.0)
        return result.metrics["slo_attainment"] >= attainment

    low, high = 0.05, 1.0
    while attained(high) and high < 10_000:
        low, high = high, high * 2
    for _ in range(8):
        mid = (low + high) / 2
        low, high = (mid, high) if attained(mid) else (low, mid)
    return round(low * mean_tokens, 1)


def utilisation_ceiling(trace: Trace, model: ReplicaModel, *, ttft_slo_s: float, min_replicas: int = 1) -> dict:
    """The highest utilisation (busy over replica-seconds) a fleet of at least ``min_replicas`` can reach on a trace.

    - Busy time is at most ``busy_max_s``: every request served alone (a prefill pass of its prompt, then one
      decode step per further output token at batch 1). Batching only shortens busy time in this model.
    - The fleet is all idle whenever no request is in the system. A request within the SLO is there from its
      arrival to at most its arrival + the SLO + its decode at the full-batch step time (an estimate: prefills
      that stall its decode are not counted); outside the union of those spans ``min_replicas`` replicas idle.

    So utilisation <= busy_max / (busy_max + min_replicas * idle_floor), whatever the policy. With
    ``min_replicas`` 0 the floor is gone, but then a request arriving at an empty fleet waits a start-up.

    Example:
        >>> from llmstack.autoscale.simulator import DEFAULT_REPLICA_MODEL
        >>> trace = Trace([0.0, 100.0], [1000, 1000], [11, 11])
        >>> utilisation_ceiling(trace, DEFAULT_REPLICA_MODEL, ttft_slo_s=1.0)["ceiling"] < 0.01
        True
    """
    m = model
    full_step = m.decode_step_s + m.decode_step_per_seq_s * (m.max_batch_size - 1)
    busy = sum(m.prefill_overhead_s + c / m.prefill_tokens_per_s + max(0, g - 1) * m.decode_step_s
               for c, g in zip(trace.context_tokens, trace.generated_tokens))
    spans = sorted((a, a + ttft_slo_s + max(0, g - 1) * full_step)
                   for a, g in zip(trace.arrival_s, trace.generated_tokens))
    first = spans[0][0] if spans else 0.0
    covered, start, end = 0.0, first, first  # the union of the spans, merged in order of arrival
    for a, b in spans:
        if a > end:
            covered += end - start
            start = a
        end = max(end, b)
    covered += end - start
    duration = end - first  # first arrival to the last request's end
    idle_floor = min_replicas * max(0.0, duration - covered)
    ceiling = busy / (busy + idle_floor) if busy + idle_floor > 0 else 0.0
    return {"ceiling": round(ceiling, 4), "busy_max_s": round(busy, 1), "idle_floor_s": round(idle_floor, 1),
            "occupied_s": round(covered, 1), "duration_s": round(duration, 1), "min_replicas": min_replicas}
