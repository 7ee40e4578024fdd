"""The metrics a vLLM dashboard reads that only llmstack's replicas and streams know (no Ray): requests waiting,
KV usage, the prefix cache in tokens, aborted streams with their tokens."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from llmstack.config import ServeConfig, load_config
from llmstack.serve.deployments.replica_metrics import ReplicaMetrics
from llmstack.serve.http import cluster_metrics
from llmstack.serve.http.cluster_metrics import aggregate
from llmstack.serve.http.metrics import ServeMetrics
from llmstack.serve.http.sse import chat_chunk, stream_response
from llmstack.serve.protocol import ChoiceDelta, GenerationChunk, GenerationRequest


def _values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _chunk(ids: list[int], *, finished: bool = False) -> GenerationChunk:
    return GenerationChunk(request_id="r", model="tiny", finished=finished, prompt_tokens=4,
                           completion_tokens=3 if finished else 0,
                           deltas=[ChoiceDelta(index=0, text="x" * len(ids), token_ids=ids)])


def test_a_replica_counts_a_request_waiting_until_its_first_token_and_holds_its_kv_until_it_ends() -> None:
    metrics = ReplicaMetrics("tiny", capacity_tokens=100)
    gate = asyncio.Event()

    async def chunks() -> AsyncIterator[GenerationChunk]:
        await gate.wait()
        yield _chunk([1, 2])
        yield _chunk([3], finished=True)

    def gauges() -> tuple[float, float]:
        values = _values(generate_latest(metrics.registry).decode())
        model = (("model", "tiny"),)
        return values[("llmstack_requests_waiting", model)], values[("llmstack_kv_cache_usage_perc", model)]

    async def main() -> None:
        tracked = metrics.track(chunks(), prompt_tokens=10, sequences=1)
        first = asyncio.ensure_future(tracked.__anext__())
        await asyncio.sleep(0.01)
        assert gauges() == (1.0, 0.0) and metrics.snapshot()["requests_waiting"] == 1
        gate.set()
        await first
        assert gauges() == (0.0, 0.12)  # the prompt and two tokens of 100
        await tracked.__anext__()
        assert gauges() == (0.0, 0.13)
        assert [c async for c in tracked] == []
        assert gauges() == (0.0, 0.0) and metrics.snapshot() == {"requests_waiting": 0, "kv_tokens_held": 0}

        never = metrics.track(chunks(), prompt_tokens=10, sequences=1)  # a request cancelled while it waits
        gate.clear()
        waiting = asyncio.ensure_future(never.__anext__())
        await asyncio.sleep(0.01)
        assert gauges()[0] == 1.0
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        await never.aclose()
        assert gauges() == (0.0, 0.0)

    asyncio.run(main())


def test_the_cluster_view_sums_waiting_averages_kv_usage_and_names_them_as_vllm_does() -> None:
    agent = "\n".join([
        "# TYPE ray_llmstack_requests_waiting gauge",
        'ray_llmstack_requests_waiting{WorkerId="w1",app="a",model="m"} 1.0',
        'ray_llmstack_requests_waiting{WorkerId="w2",app="a",model="m"} 2.0',
        "# TYPE ray_llmstack_kv_cache_usage_perc gauge",
        'ray_llmstack_kv_cache_usage_perc{WorkerId="w1",app="a",model="m"} 0.25',
        'ray_llmstack_kv_cache_usage_perc{WorkerId="w2",app="a",model="m"} 0.75',
        "# TYPE ray_llmstack_prefix_cache_query_tokens_total counter",
        'ray_llmstack_prefix_cache_query_tokens_total{WorkerId="w1",app="a",model="m"} 40.0',
        "# TYPE ray_llmstack_prefix_cache_hit_tokens_total counter",
        'ray_llmstack_prefix_cache_hit_tokens_total{WorkerId="w1",app="a",model="m"} 32.0',
    ]) + "\n"
    values = _values(aggregate([agent], "a"))
    assert values[("llmstack_requests_waiting", (("model", "m"),))] == 3.0
    assert values[("vllm:num_requests_waiting", (("model_name", "m"),))] == 3.0
    assert values[("llmstack_kv_cache_usage_perc", (("model", "m"),))] == 0.5
    assert values[("vllm:gpu_cache_usage_perc", (("model_name", "m"),))] == 0.5
    assert values[("vllm:prefix_cache_queries_total", (("model_name", "m"),))] == 40.0  # tokens, as vLLM counts
    assert values[("vllm:prefix_cache_hits_total", (("model_name", "m"),))] == 32.0


def test_prefix_cache_queries_are_counted_in_prompt_tokens() -> None:
    metrics = ServeMetrics()
    metrics.observe_result("tiny", prompt_tokens=40, completion_tokens=2, timing=None, cached=False,
                           prefix_cached_tokens=32)
    metrics.observe_result("tiny", prompt_tokens=8, completion_tokens=2, timing=None, cached=False,
                           prefix_cached_tokens=0)
    values = _values(metrics.render()[0].decode())
    assert values[("llmstack_prefix_cache_query_tokens_total", (("model", "tiny"),))] == 48.0
    assert values[("llmstack_prefix_cache_hit_tokens_total", (("model", "tiny"),))] == 32.0


class _Endless:
    """Streams one token per chunk until cancelled."""

    async def stream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        i = 0
        while True:
            await asyncio.sleep(0)
            i += 1
            yield _chunk([i, i + 1])


class _Short:
    async def stream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        yield _chunk([1, 2])
        yield _chunk([3], finished=True)


def test_a_stream_the_client_leaves_is_counted_aborted_with_its_tokens() -> None:
    cfg = load_config(ServeConfig, {})

    async def consume(engine: Any, metrics: ServeMetrics, parts: int | None) -> None:
        response = await stream_response(engine, [GenerationRequest(model="tiny", messages=[])], "tiny",
                                         chat_chunk(), cfg, metrics, None)
        body = response.body_iterator
        seen = 0
        async for _ in body:
            seen += 1
            if parts is not None and seen == parts:
                break
        await body.aclose()  # what Starlette does when the client disconnects

    left, finished = ServeMetrics(), ServeMetrics()
    asyncio.run(consume(_Endless(), left, parts=3))
    asyncio.run(consume(_Short(), finished, parts=None))
    values = _values(left.render()[0].decode())
    assert values[("llmstack_requests_aborted_total", (("model", "tiny"),))] == 1.0
    assert values[("llmstack_aborted_completion_tokens_total", (("model", "tiny"),))] == 6.0  # 3 chunks of 2
    assert ("llmstack_requests_aborted_total", (("model", "tiny"),)) not in _values(finished.render()[0].decode())


def test_an_agent_that_stops_answering_counts_with_its_last_good_export(monkeypatch: Any) -> None:
    """A busy node's metrics agent that misses the scrape timeout must not make the cluster total step back."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from prometheus_client import CollectorRegistry

    export = ("# TYPE ray_llmstack_requests_total counter\n"
              'ray_llmstack_requests_total{WorkerId="other",app="a",route="completions",status="200"} 9.0\n')
    stalled = threading.Event()

    class Agent(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if stalled.is_set():
                stalled.wait(2.0)  # longer than the scrape timeout below
                self.send_response(503)
                self.end_headers()
                return
            body = export.encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Agent)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(cluster_metrics, "AGENT_TIMEOUT_S", 0.5)
    url = f"http://127.0.0.1:{server.server_port}/metrics"
    last_good: dict[str, str] = {}
    labels = (("route", "completions"), ("status", "200"))
    try:
        def total() -> float:
            text = asyncio.run(cluster_metrics.cluster_text("a", [url], own=CollectorRegistry(), worker_id="me",
                                                            last_good=last_good))
            return _values(text).get(("llmstack_requests_total", labels), 0.0)

        assert total() == 9.0
        stalled.set()
        assert total() == 9.0  # the agent timed out: its last export still counts
        assert asyncio.run(cluster_metrics.cluster_text("a", [], own=CollectorRegistry(), worker_id="me",
                                                        last_good=last_good)) == "\n"
        assert last_good == {}  # a node that left is forgotten
    finally:
        stalled.clear()
        server.shutdown()



def test_counters_never_step_back_whichever_replica_answers() -> None:
    """Two replicas each see their own series live and the other's as last exported, so the replica answering
    second can sum less than the first answered. Raised through one HighWater the answers never step back
    (counters and histograms); a gauge is served as summed."""
    def export(worker: str, requests: float, waiting: float, latency: float) -> str:
        labels = f'WorkerId="{worker}",app="a"'
        return "\n".join([
            "# TYPE ray_llmstack_requests_total counter",
            f'ray_llmstack_requests_total{{{labels},route="completions",status="200"}} {requests}',
            "# TYPE ray_llmstack_requests_waiting gauge",
            f'ray_llmstack_requests_waiting{{{labels},model="m"}} {waiting}',
            "# TYPE ray_llmstack_request_latency_seconds histogram",
            f'ray_llmstack_request_latency_seconds_bucket{{{labels},model="m",le="+Inf"}} {requests}',
            f'ray_llmstack_request_latency_seconds_count{{{labels},model="m"}} {requests}',
            f'ray_llmstack_request_latency_seconds_sum{{{labels},model="m"}} {latency}',
        ]) + "\n"

    high_water = cluster_metrics.HighWater()

    async def raise_to(values: dict) -> dict:
        return high_water.raise_to(values)

    def scrape(texts: list[str]) -> dict:
        kinds, sums = cluster_metrics.summed(texts, "a")
        asyncio.run(cluster_metrics.raise_monotonic(kinds, sums, raise_to))
        return _values(cluster_metrics.render(kinds, sums))

    total = ("llmstack_requests_total", (("route", "completions"), ("status", "200")))
    count = ("vllm:e2e_request_latency_seconds_count", (("model_name", "m"),))
    waiting = ("llmstack_requests_waiting", (("model", "m"),))
    first = scrape([export("w1", 14, 3, 7.0), export("w2", 12, 1, 6.0)])  # replica 1: its own 14, w2's export 12
    second = scrape([export("w1", 10, 0, 5.0), export("w2", 15, 0, 7.5)])  # replica 2: w1's export 10, its own 15
    assert first[total] == 26.0 and first[waiting] == 4.0
    assert second[total] == 26.0 and second[count] == 26.0  # summed 25: raised to what was served before
    assert second[("llmstack_request_latency_seconds_sum", (("model", "m"),))] == 13.0
    assert second[waiting] == 0.0  # a gauge may go down
    assert scrape([export("w1", 14, 0, 7.0), export("w2", 15, 0, 7.5)])[total] == 29.0  # caught up: the truth
