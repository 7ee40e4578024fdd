"""/metrics that add up across ingress replicas and nodes, through Ray's metrics system.

Each ingress replica records its metrics twice: in its own Prometheus registry (unit tests, a process
without Ray) and through ``ray.util.metrics`` (tagged with the app's name), which every node's Ray metrics
agent exports with each worker's series apart. ``/metrics`` reads every alive node's agent, keeps this
app's ``llmstack_*`` series, drops the per-worker labels and sums the rest: the cluster's totals, the same
whichever replica answers. The answering replica's own series come from its registry (always current);
the other replicas' lag by Ray's metrics report interval (a few seconds), so with several replicas the
totals are exact, and the same from every replica, once the agents have exported. Counters and histograms
never step back from one scrape to the next whichever replica answers: each answer is raised to the highest
value any replica answered before (a :class:`HighWater` actor per app; the sums only ever under-count until
the exports catch up, so the highest is the truest). Each ``llmstack_*`` family is also served under the name a
vLLM dashboard reads (``vllm:num_requests_running``, ``vllm:e2e_request_latency_seconds``, ...), its ``model``
label as vLLM's ``model_name``.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

RAY_PREFIX = "ray_"
WORKER_LABELS = {"Component", "NodeAddress", "SessionName", "Version", "WorkerId", "otel_scope_name",
                 "otel_scope_schema_url", "otel_scope_version", "JobId", "ReplicaId", "instance", "app"}
VLLM_NAMES = {  # llmstack family -> the vLLM family it also appears as
    "llmstack_requests_in_flight": "vllm:num_requests_running",
    "llmstack_time_to_first_token_seconds": "vllm:time_to_first_token_seconds",
    "llmstack_time_per_output_token_seconds": "vllm:time_per_output_token_seconds",
    "llmstack_request_latency_seconds": "vllm:e2e_request_latency_seconds",
    "llmstack_prompt_tokens": "vllm:prompt_tokens",
    "llmstack_completion_tokens": "vllm:generation_tokens",
    # vLLM counts its prefix cache in tokens: queried prompt tokens and the tokens found cached
    "llmstack_prefix_cache_query_tokens": "vllm:prefix_cache_queries",
    "llmstack_prefix_cache_hit_tokens": "vllm:prefix_cache_hits",
    "llmstack_requests_waiting": "vllm:num_requests_waiting",
    "llmstack_kv_cache_usage_perc": "vllm:gpu_cache_usage_perc",
}
AGENT_TIMEOUT_S = 5.0  # per metrics-agent scrape; a slower agent counts with its last good export
AVERAGED_SUFFIX = "_perc"  # a fraction per replica (KV usage): the cluster's value is the mean, not the sum


def in_ray_worker() -> bool:
    """True inside a Ray worker (a Serve replica): where Ray's metrics agent collects what is recorded."""
    import sys

    if "ray" not in sys.modules:
        return False
    import ray

    try:
        return ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE
    except Exception:  # noqa: BLE001 - no runtime context: not a worker
        return False


class Mirror:
    """A prometheus_client metric whose every update is also recorded through ``ray.util.metrics``."""

    def __init__(self, local: Any, ray_metric: Any, app: str, kind: str) -> None:
        self.local, self.ray_metric, self.app, self.kind = local, ray_metric, app, kind
        self._labelnames = tuple(local._labelnames)

    def labels(self, *values: str) -> _MirrorChild:
        tags = {**dict(zip(self._labelnames, (str(v) for v in values))), "app": self.app}
        return _MirrorChild(self.local.labels(*values), self.ray_metric, tags, self.kind)


class _MirrorChild:
    def __init__(self, local: Any, ray_metric: Any, tags: dict[str, str], kind: str) -> None:
        self.local, self.ray_metric, self.tags, self.kind = local, ray_metric, tags, kind

    def inc(self, amount: float = 1.0) -> None:
        self.local.inc(amount)
        if self.kind == "gauge":
            self.ray_metric.set(self.local._value.get(), tags=self.tags)
        elif amount:
            self.ray_metric.inc(amount, tags=self.tags)

    def dec(self, amount: float = 1.0) -> None:
        self.local.dec(amount)
        self.ray_metric.set(self.local._value.get(), tags=self.tags)

    def set(self, value: float) -> None:
        self.local.set(value)
        self.ray_metric.set(value, tags=self.tags)

    def observe(self, value: float) -> None:
        self.local.observe(value)
        self.ray_metric.observe(value, tags=self.tags)


def mirror(local: Any, app: str, buckets: tuple[float, ...] | None = None) -> Mirror:
    """``local`` (a prometheus_client Counter, Gauge or Histogram) mirrored to a Ray metric of the same name."""
    from ray.util import metrics as ray_metrics

    kind = local._type  # "counter" | "gauge" | "histogram"
    tag_keys = (*local._labelnames, "app")
    name = local._name + ("_total" if kind == "counter" else "")
    if kind == "counter":
        remote = ray_metrics.Counter(name, description=local._documentation, tag_keys=tag_keys)
    elif kind == "gauge":
        remote = ray_metrics.Gauge(name, description=local._documentation, tag_keys=tag_keys)
    else:
        remote = ray_metrics.Histogram(name, description=local._documentation, boundaries=list(buckets or ()),
                                       tag_keys=tag_keys)
    return Mirror(local, remote, app, kind)


def agent_urls() -> list[str]:
    """The Prometheus endpoint of every alive node's Ray metrics agent."""
    import ray

    return [f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
            for node in ray.nodes() if node.get("Alive") and node.get("MetricsExportPort")]


Labels = tuple[tuple[str, str], ...]
Series = dict[str, dict[tuple[str, Labels], float]]  # family -> (sample, labels) -> value
Peaks = dict[tuple[str, str, Labels], float]  # (family, sample, labels) -> value
MONOTONIC_KINDS = ("counter", "histogram")  # every sample of these only grows (latencies are >= 0)


class HighWater:
    """The highest value of each counter and histogram sample that any ingress replica of one app served
    (a Ray actor, see :func:`high_water_actor`)."""

    def __init__(self) -> None:
        self.highest: Peaks = {}

    def raise_to(self, values: Peaks) -> Peaks:
        """Each of ``values`` raised to the highest served before; the result becomes the new highest."""
        for key, value in values.items():
            self.highest[key] = max(value, self.highest.get(key, value))
        return {key: self.highest[key] for key in values}


def high_water_actor(app: str) -> Any:
    """The app's :class:`HighWater` actor, created by the first replica that asks (it lives as long as that
    replica; a successor starts from the exports, which have caught up by then)."""
    import ray

    actor = ray.remote(num_cpus=0)(HighWater)
    return actor.options(name=f"llmstack-metrics-high-water:{app}", get_if_exists=True).remote()


async def cluster_text(app: str, urls: list[str], *, own: Any, worker_id: str,
                       last_good: dict[str, str] | None = None,
                       raise_to: Callable[[Peaks], Awaitable[Peaks]] | None = None) -> str:
    """This app's ``llmstack_*`` series summed over every worker of every node, as Prometheus text (with the
    vLLM-named copies). This replica's own series (worker ``worker_id``) come from ``own`` (its registry),
    always current; the other replicas' as their agents last exported them. An agent that does not answer in
    time (a busy node) counts with its last good export from ``last_good`` (updated here), so a slow agent
    never makes a cluster total step back. ``raise_to`` (:meth:`HighWater.raise_to`, awaited) raises counters
    and histograms to what any replica served before."""
    import httpx

    last_good = {} if last_good is None else last_good
    async with httpx.AsyncClient(timeout=AGENT_TIMEOUT_S) as client:
        replies = await asyncio.gather(*[client.get(url) for url in urls], return_exceptions=True)
    texts = []
    for url, reply in zip(urls, replies):
        if not isinstance(reply, BaseException) and reply.status_code == 200:
            last_good[url] = reply.text
        if url in last_good:
            texts.append(last_good[url])
    for gone in set(last_good) - set(urls):  # a node that left the cluster
        del last_good[gone]
    kinds, sums = summed(texts, app, own=list(own.collect()), worker_id=worker_id)
    if raise_to is not None:
        await raise_monotonic(kinds, sums, raise_to)
    return render(kinds, sums)


async def raise_monotonic(kinds: dict[str, tuple[str, str]], sums: Series,
                          raise_to: Callable[[Peaks], Awaitable[Peaks]]) -> None:
    """Replace the counter and histogram samples of ``sums`` with ``await raise_to(them)``."""
    monotonic = {(name, sample, labels): value for name, series in sums.items()
                 if kinds[name][0] in MONOTONIC_KINDS for (sample, labels), value in series.items()}
    for (name, sample, labels), value in (await raise_to(monotonic)).items():
        sums[name][(sample, labels)] = value


def aggregate(texts: list[str], app: str, *, own: list[Any] = (), worker_id: str | None = None) -> str:  # type: ignore[assignment]
    """Sum the ``ray_llmstack_*`` samples of ``app`` in ``texts`` (agent exports) over worker labels, with the
    series of worker ``worker_id`` replaced by ``own`` (prometheus_client metric families of that worker)."""
    return render(*summed(texts, app, own=own, worker_id=worker_id))


def summed(texts: list[str], app: str, *, own: list[Any] = (), worker_id: str | None = None  # type: ignore[assignment]
           ) -> tuple[dict[str, tuple[str, str]], Series]:
    """(family -> (type, help), the sums) of :func:`aggregate`."""
    from prometheus_client.parser import text_string_to_metric_families

    kinds: dict[str, tuple[str, str]] = {}  # family -> (type, help)
    sums: Series = defaultdict(lambda: defaultdict(float))
    counts: dict[tuple[str, tuple[tuple[str, str], ...]], int] = defaultdict(int)  # samples summed (for means)
    for text in texts:
        for family in text_string_to_metric_families(text):
            if not family.name.startswith(RAY_PREFIX + "llmstack_"):
                continue
            name = family.name[len(RAY_PREFIX):]
            kinds.setdefault(name, (family.type, family.documentation))
            for sample in family.samples:
                if sample.labels.get("app") != app or (own and sample.labels.get("WorkerId") == worker_id):
                    continue
                labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k not in WORKER_LABELS))
                sums[name][(sample.name[len(RAY_PREFIX):], labels)] += sample.value
                counts[(sample.name[len(RAY_PREFIX):], labels)] += 1
    for family in own:
        kinds.setdefault(family.name, (family.type, family.documentation))
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            labels = tuple(sorted(sample.labels.items()))
            sums[family.name][(sample.name, labels)] += sample.value
            counts[(sample.name, labels)] += 1
    for name in sums:
        if name.endswith(AVERAGED_SUFFIX):
            sums[name] = defaultdict(float, {key: value / max(1, counts[key]) for key, value in sums[name].items()})
    return kinds, sums


def render(kinds: dict[str, tuple[str, str]], sums: Series) -> str:
    """Prometheus text of :func:`summed`'s families, each also under its vLLM name."""
    lines: list[str] = []
    for name in sorted(sums):
        kind, documentation = kinds[name]
        for family, rename in ((name, None), (VLLM_NAMES.get(_base(name)), "model_name")):
            if family is None:
                continue
            lines += [f"# HELP {family} {documentation}", f"# TYPE {family} {kind}"]
            for (sample, labels), value in sorted(sums[name].items()):
                sample = family + sample[len(name):]
                shown = [(rename if k == "model" and rename else k, v) for k, v in labels]
                label_text = ",".join(f'{k}="{_escape(v)}"' for k, v in shown)
                lines.append(f"{sample}{{{label_text}}} {value!r}" if label_text else f"{sample} {value!r}")
    return "\n".join(lines) + "\n"


def _base(name: str) -> str:
    return name[:-len("_total")] if name.endswith("_total") else name


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
