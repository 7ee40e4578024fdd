"""Timing an engine in-process for the autoscaling simulator: prefill rate and decode step times.

Lives beside the engines it times; it fills :class:`llmstack.autoscale.simulator.ReplicaModel` (serve may import
autoscale, autoscale never imports serve).
"""

from __future__ import annotations

from typing import Any

from llmstack.autoscale.simulator import ReplicaModel


def calibrate_replica_model(engine: Any, *, startup_s: float, request_overhead_s: float = 0.0,
                            prompt_tokens: int = 200, decode_tokens: int = 32, max_batch_size: int = 8,
                            repeats: int = 3) -> ReplicaModel:
    """Measure an engine's prefill rate and decode step times (batch 1 and ``max_batch_size``) in-process.

    ``engine`` is a :class:`~llmstack.serve.engine.TransformersEngine`; the start-up time and the HTTP
    overhead per request are measured elsewhere (on the live app) and passed in.

    Example:
        >>> engine = TransformersEngine.from_source("tiny-lm@v1")  # doctest: +SKIP
        >>> model = calibrate_replica_model(engine, startup_s=8.0)  # doctest: +SKIP
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
