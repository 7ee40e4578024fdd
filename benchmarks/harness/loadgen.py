"""The benchmarks' HTTP load: ``llmstack.serve.loadgen`` (the closed-loop thread clients the integration tests
use too) for loads that run until stopped, and :func:`closed_loop`, an asyncio client for a fixed number of
requests per client that reports throughput and latency percentiles.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from llmstack.serve.loadgen import (DONE, ClosedLoop, CompletionLoad, CompletionSample, line_prompt, percentile,
                                    post_completion, sse_events, summarize)

__all__ = ["DONE", "PROMPTS", "ClosedLoop", "CompletionLoad", "CompletionSample", "closed_loop", "line_prompt",
           "post_completion", "run_for", "send_completion", "sse_events", "summarize"]

PROMPTS = [f"line {i}: the value of x is {i * 7} and y is" for i in range(64)]


def run_for(load: CompletionLoad, seconds: float) -> dict[str, float]:
    """Run ``load`` for ``seconds`` and summarize it (requests, failed, rps, p50/p95 ms)."""
    with load:
        time.sleep(seconds)
    return summarize(load.samples, seconds)


async def send_completion(client: Any, url: str, body: dict[str, Any]) -> dict[str, Any]:
    """POST one completion with the async ``client``: status, latency, TTFT (streamed) and completion tokens."""
    start = time.perf_counter()
    if not body.get("stream"):
        r = await client.post(url + "/v1/completions", json=body)
        end = time.perf_counter()
        data = r.json()
        tokens = data.get("usage", {}).get("completion_tokens", 0) if r.status_code == 200 else 0
        return {"status": r.status_code, "latency": end - start, "ttft": None, "tokens": tokens}
    ttft, tokens, status = None, 0, 0
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        status = r.status_code
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("choices") and event["choices"][0].get("text") is not None:
                tokens += 1
                if ttft is None:
                    ttft = time.perf_counter() - start
    return {"status": status, "latency": time.perf_counter() - start, "ttft": ttft, "tokens": tokens}


async def closed_loop(url: str, *, clients: int, requests_per_client: int, max_tokens: int, stream: bool = False,
                      seed_base: int = 0, extra: dict[str, Any] | None = None,
                      prompts: list[str] | None = None) -> dict[str, Any]:
    """``clients`` concurrent asyncio clients, each sending ``requests_per_client`` requests back to back;
    greedy, no response-cache hits (each request has its own seed). ``extra`` goes into every request body
    (``model``, ``ignore_eos``, ``min_tokens``); ``prompts`` defaults to :data:`PROMPTS`, taken in turn."""
    import httpx

    prompts = prompts or PROMPTS
    results: list[dict[str, Any]] = []
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        async def worker(w: int) -> None:
            for k in range(requests_per_client):
                seed = seed_base + w * 10_000 + k  # greedy ignores it; the response cache keys on it
                body = {"prompt": prompts[(w * 7 + k) % len(prompts)], "max_tokens": max_tokens,
                        "temperature": 0, "seed": seed, "stream": stream, **(extra or {})}
                results.append(await send_completion(client, url, body))

        start = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(clients)))
        elapsed = time.perf_counter() - start
    ok = [r for r in results if r["status"] == 200]
    tokens = sum(r["tokens"] for r in ok)
    ttfts = [r["ttft"] for r in ok if r["ttft"] is not None]
    return {"clients": clients, "requests": len(results), "ok": len(ok), "seconds": elapsed,
            "tokens": tokens, "tokens_per_s": tokens / elapsed, "requests_per_s": len(ok) / elapsed,
            "latency_p50_s": percentile([r["latency"] for r in ok], 50),
            "latency_p95_s": percentile([r["latency"] for r in ok], 95),
            "ttft_p50_s": percentile(ttfts, 50) if ttfts else None,
            "ttft_p95_s": percentile(ttfts, 95) if ttfts else None}
