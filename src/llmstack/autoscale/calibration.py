"""Calibrating the simulator: a replica's measured costs, and the load one replica sustains at the SLO.

- :func:`calibrate_replica_model` times an engine in-process (prefill rate, decode step at batch 1 and full).
- :func:`replica_capacity` finds, in the simulator, the token rate one replica serves within the TTFT SLO.
"""

from __future__ import annotations

from typing import Any

from llmstack.autoscale.simulator import ReplicaModel, simulate
from llmstack.autoscale.trace import Trace
from llmstack.config import PredictiveScalingConfig, ReplicaAutoscalingConfig


def calibrate_replica_model(engine: Any, *, startup_s: float, request_overhead_s: float = 0.0,
                            prompt_tokens: int = 200, decode_tokens: int = 32, max_batch_size: int = 8,
                            repeats: int = 3) -> ReplicaModel:
    """Measure an engine's prefill rate and decode step times (batch 1 and ``max_batch_size``) in-process.

    ``engine`` is a :class:`~llmstack.serve.engine.TransformersEngine`; the start-up time and the HTTP
    overhead per request are measured elsewhere (on the live app) and passed in.

    Example:
        >>> model = calibrate_replica_model(TransformersEngine.from_source("tiny-lm@v1"), startup_s=8.0)  # doctest: +SKIP
    """
    import asyncio
    import statistics
    import time

    from llmstack.serve.protocol import GenerationRequest, SamplingParams

    def timed(batch: int, new_tokens: int) -> float:
        requests = [GenerationRequest(model=engine.model_id, prompt=[10 + (i * 7 + j * 13) % 200
                                                                     for j in range(prompt_tokens)],
                                      sampling=SamplingParams(max_tokens=new_tokens, temperature=0.0))
                    for i in range(batch)]
        start = time.perf_counter()
        asyncio.run(engine.generate_batch(requests))
        return time.perf_counter() - start

    timed(1, 2)  # warm-up
    samples: dict[tuple[int, int], float] = {}
    for batch in (1, max_batch_size):
        for new_tokens in (1, decode_tokens + 1):
            samples[(batch, new_tokens)] = statistics.median(timed(batch, new_tokens) for _ in range(repeats))
    prefill_1, prefill_n = samples[(1, 1)], samples[(max_batch_size, 1)]
    step_1 = max(1e-5, (samples[(1, decode_tokens + 1)] - prefill_1) / decode_tokens)
    step_n = max(step_1, (samples[(max_batch_size, decode_tokens + 1)] - prefill_n) / decode_tokens)
    prefill_rate = max_batch_size * prompt_tokens / prefill_n
    return ReplicaModel(prefill_tokens_per_s=round(prefill_rate, 1), decode_step_s=round(step_1, 6),
                        decode_step_per_seq_s=round((step_n - step_1) / (max_batch_size - 1), 7),
                        startup_s=round(startup_s, 3), request_overhead_s=round(request_overhead_s, 4),
                        prefill_overhead_s=round(max(0.0, prefill_1 - prompt_tokens / prefill_rate), 5),
                        max_batch_size=max_batch_size)


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
