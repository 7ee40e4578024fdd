"""What only a model replica knows, as gauges: requests waiting for their first token and the KV it holds.

Recorded in the replica's own Prometheus registry and, inside Ray, through Ray's metrics system under the
app's name, so the ingress's cluster-wide ``/metrics`` serves them (as ``vllm:num_requests_waiting`` and
``vllm:gpu_cache_usage_perc`` too): waiting requests summed over replicas, KV usage averaged over them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from llmstack.serve.protocol import GenerationChunk


class ReplicaMetrics:
    """``llmstack_requests_waiting`` (arrived, no token yet) and ``llmstack_kv_cache_usage_perc`` (tokens held by
    this replica's running sequences over its ``capacity_tokens``: max_batch_size sequences of max_model_len).

    Args:
        model: the ``model`` label (the served base model's id).
        capacity_tokens: the KV tokens the replica holds when every decode slot is full.
        cluster_app: also record through Ray's metrics system under this app's name (None: outside Ray).
    """

    def __init__(self, model: str, *, capacity_tokens: int, cluster_app: str | None = None) -> None:
        from prometheus_client import CollectorRegistry, Gauge

        self.registry = CollectorRegistry()
        self.capacity_tokens = max(1, capacity_tokens)
        self.model = model
        self.waiting = Gauge("llmstack_requests_waiting", "Requests received by a model replica that have no "
                             "token yet (queued for a batch or in prefill)", ["model"], registry=self.registry)
        self.kv_usage = Gauge("llmstack_kv_cache_usage_perc", "Fraction of a model replica's KV capacity "
                              "(max_batch_size sequences of max_model_len tokens) held by its running sequences",
                              ["model"], registry=self.registry)
        if cluster_app is not None:
            from llmstack.serve.http.cluster_metrics import mirror

            self.waiting = mirror(self.waiting, cluster_app)
            self.kv_usage = mirror(self.kv_usage, cluster_app)
        self.held_tokens = 0
        self.waiting_requests = 0
        self.waiting.labels(model).inc(0)
        self._set_usage()

    def _set_usage(self) -> None:
        self.kv_usage.labels(self.model).set(min(1.0, self.held_tokens / self.capacity_tokens))

    def snapshot(self) -> dict[str, int]:
        """The gauges' current values for ``LLMServer.stats``: requests waiting and KV tokens held."""
        return {"requests_waiting": self.waiting_requests, "kv_tokens_held": self.held_tokens}

    def _wait(self, change: int) -> None:
        self.waiting_requests += change
        self.waiting.labels(self.model).inc(change)

    def _hold(self, tokens: int) -> None:
        self.held_tokens += tokens
        self._set_usage()

    async def track(self, chunks: AsyncIterator[GenerationChunk], *, prompt_tokens: int,
                    sequences: int) -> AsyncIterator[GenerationChunk]:
        """``chunks`` passed through, counted as waiting until the first arrives, then holding its prompt (per
        sequence) and every token generated in the KV until it ends."""
        self._wait(1)
        started, held = False, 0
        try:
            async for chunk in chunks:
                added = sum(len(delta.token_ids) for delta in chunk.deltas)
                if not started:
                    started = True
                    self._wait(-1)
                    added += prompt_tokens * sequences
                held += added
                self._hold(added)
                yield chunk
        finally:
            if not started:
                self._wait(-1)
            self._hold(-held)
