"""Prometheus metrics of the OpenAI ingress, on a registry of their own (served at ``/metrics``)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
UNKNOWN_MODEL = "unknown"  # the one label value of every model name the server does not serve


def model_label(model: str, cards: Iterable[Any]) -> str:
    """The ``model`` label of a request: the name as asked when a served model or adapter answers to it
    (its id, root or an alias), else :data:`UNKNOWN_MODEL`, so clients cannot grow /metrics with made-up names."""
    for card in cards:
        if model in (card.id, card.root, *card.aliases):
            return model
    return UNKNOWN_MODEL


class ServeMetrics:
    """Requests, tokens, in-flight requests (queue depth), latency, time to first token, batch sizes.

    ``cluster_app``: also record through Ray's metrics system under this app's name, and render the cluster's
    totals (:mod:`llmstack.serve.http.cluster_metrics`); None (outside Ray): this process's own registry.
    """

    def __init__(self, cluster_app: str | None = None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("llmstack_requests", "HTTP requests by route and status code",
                                ["route", "model", "status"], registry=r)
        self.prompt_tokens = Counter("llmstack_prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.completion_tokens = Counter("llmstack_completion_tokens", "Tokens generated", ["model"], registry=r)
        self.in_flight = Gauge("llmstack_requests_in_flight",
                               "Requests received and not yet answered (queue depth seen by the ingress)",
                               ["model"], registry=r)
        self.latency = Histogram("llmstack_request_latency_seconds", "End-to-end request latency",
                                 ["route", "model"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("llmstack_time_to_first_token_seconds", "Arrival to first generated token",
                              ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.time_per_token = Histogram("llmstack_time_per_output_token_seconds",
                                        "Seconds between a stream's tokens (decode step time seen by a client)",
                                        ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("llmstack_queue_wait_seconds", "Arrival to the start of the request's batch",
                                    ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("llmstack_batch_size", "Sequences decoded together with a request",
                                    ["model"], buckets=BATCH_BUCKETS, registry=r)
        self.cache_hits = Counter("llmstack_response_cache_hits", "Requests answered from the response cache",
                                  ["model"], registry=r)
        self.prefix_queries = Counter("llmstack_prefix_cache_queries",
                                      "Prompts looked up in the prefix cache", ["model"], registry=r)
        self.prefix_hits = Counter("llmstack_prefix_cache_hits",
                                   "Prompts that reused at least one cached prefix block", ["model"], registry=r)
        self.prefix_hit_tokens = Counter("llmstack_prefix_cache_hit_tokens",
                                         "Prompt tokens whose KV states came from the prefix cache", ["model"],
                                         registry=r)
        self.prefix_query_tokens = Counter("llmstack_prefix_cache_query_tokens",
                                           "Prompt tokens looked up in the prefix cache", ["model"], registry=r)
        self.aborted = Counter("llmstack_requests_aborted",
                               "Streams the client left before they finished", ["model"], registry=r)
        self.aborted_tokens = Counter("llmstack_aborted_completion_tokens",
                                      "Tokens generated for streams the client left (not in completion_tokens)",
                                      ["model"], registry=r)
        self.shed = Counter("llmstack_requests_shed", "Requests refused because the queue was full",
                            ["model"], registry=r)
        self.resumed = Counter("llmstack_resumed_requests", "Requests resumed on another replica after theirs died",
                               ["model"], registry=r)
        self.cluster_app = cluster_app
        self.agent_exports: dict[str, str] = {}  # metrics-agent URL -> its last good export (see cluster_text)
        self.high_water: Any = None  # the app's HighWater actor, found on the first cluster scrape
        if cluster_app is not None:
            from llmstack.serve.http.cluster_metrics import mirror

            for attr, buckets in (("requests", None), ("prompt_tokens", None), ("completion_tokens", None),
                                  ("in_flight", None), ("latency", LATENCY_BUCKETS), ("ttft", LATENCY_BUCKETS),
                                  ("time_per_token", LATENCY_BUCKETS), ("queue_wait", LATENCY_BUCKETS),
                                  ("batch_size", BATCH_BUCKETS),
                                  ("cache_hits", None), ("prefix_queries", None), ("prefix_hits", None),
                                  ("prefix_hit_tokens", None), ("prefix_query_tokens", None),
                                  ("aborted", None), ("aborted_tokens", None), ("shed", None), ("resumed", None)):
                setattr(self, attr, mirror(getattr(self, attr), cluster_app, buckets))

    def observe_result(self, model: str, *, prompt_tokens: int, completion_tokens: int, timing: Any,
                       cached: bool, prefix_cached_tokens: int | None = None, resumed: int = 0) -> None:
        self.observe_prefix(model, prefix_cached_tokens, prompt_tokens=prompt_tokens)
        if resumed:
            self.resumed.labels(model).inc()
        self.prompt_tokens.labels(model).inc(prompt_tokens)
        self.completion_tokens.labels(model).inc(completion_tokens)
        if cached:
            self.cache_hits.labels(model).inc()
        if timing is not None:
            if timing.ttft_s is not None:
                self.ttft.labels(model).observe(timing.ttft_s)
            if not cached:
                self.queue_wait.labels(model).observe(timing.queue_s)
                self.batch_size.labels(model).observe(timing.batch_size)

    def observe_prefix(self, model: str, cached_tokens: int | None, *, prompt_tokens: int | None = None) -> None:
        """One prompt's prefix-cache lookup (None: the cache was not asked, e.g. a response-cache hit) of its
        ``prompt_tokens`` (vLLM counts queries in tokens)."""
        if cached_tokens is None:
            return
        self.prefix_queries.labels(model).inc()
        if prompt_tokens is not None:
            self.prefix_query_tokens.labels(model).inc(prompt_tokens)
        if cached_tokens:
            self.prefix_hits.labels(model).inc()
            self.prefix_hit_tokens.labels(model).inc(cached_tokens)

    def observe_aborted(self, model: str, generated_tokens: int) -> None:
        """A stream the client left before it finished, with the tokens generated for it so far."""
        self.aborted.labels(model).inc()
        self.aborted_tokens.labels(model).inc(generated_tokens)

    def render(self) -> tuple[bytes, str]:
        """This process's own metrics."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    async def render_served(self) -> tuple[bytes, str]:
        """What /metrics serves: the cluster's totals when recording through Ray, else :meth:`render`."""
        if self.cluster_app is None:
            return self.render()
        from prometheus_client import CONTENT_TYPE_LATEST

        import ray

        from llmstack.serve.http.cluster_metrics import agent_urls, cluster_text

        urls = await asyncio.to_thread(agent_urls)  # a GCS call: kept off the replica's event loop
        text = await cluster_text(self.cluster_app, urls, own=self.registry,
                                  worker_id=ray.get_runtime_context().get_worker_id(),
                                  last_good=self.agent_exports, raise_to=self._raise_to_high_water)
        return text.encode(), CONTENT_TYPE_LATEST

    async def _raise_to_high_water(self, values: dict[Any, float]) -> dict[Any, float]:
        """``values`` raised by the app's HighWater actor (found or created on first use; found again after
        its replica died, this answer then left as it is)."""
        from llmstack.serve.http.cluster_metrics import high_water_actor

        try:
            if self.high_water is None:
                self.high_water = await asyncio.to_thread(high_water_actor, self.cluster_app)
            return await self.high_water.raise_to.remote(values)
        except Exception:  # noqa: BLE001 - the actor died with the replica that made it
            self.high_water = None
            return values


def append_metrics(app: Any, extra: Any, *, summary: str = "Prometheus metrics") -> None:
    """Serve ``/metrics`` as the app's own metrics followed by ``await extra()`` (text), one scrape target.

    Routers in front of the model (canary, regions) keep metrics of their own; this replaces the plain route.
    """
    from fastapi.responses import Response
    from fastapi.routing import APIRoute

    own = app.state.metrics

    async def metrics_route() -> Response:
        body, content_type = await own.render_served()
        return Response(body + (await extra()).encode(), media_type=content_type)

    app.router.routes[:] = [r for r in app.router.routes if not (isinstance(r, APIRoute) and r.path == "/metrics")]
    app.add_api_route("/metrics", metrics_route, methods=["GET"], summary=summary, response_class=Response)
