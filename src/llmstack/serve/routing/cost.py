"""Cost accounting per region: each answer's measured replica-seconds x the region's price, as Prometheus counters.

A request's replica-seconds are the time it held a replica (arrival at its batch to its last token,
measured inside the engine) divided by the sequences it shared the batch with: a batch of 8 costs each
request an eighth of the replica's time. Answers from the response cache cost nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from llmstack.serve.protocol import Timing

ROUTER_INFO = "llmstack_region_router_replica"


def replica_seconds(timing: Timing | None, *, cached: bool = False) -> float:
    """The replica time one request used (0 for a cached answer or no timing)."""
    if cached or timing is None:
        return 0.0
    return max(0.0, timing.total_s - timing.queue_s) / max(1, timing.batch_size)


def dollars(seconds: float, price_per_replica_hour: float) -> float:
    return seconds * price_per_replica_hour / 3600.0


class RegionMetrics:
    """Prometheus metrics of the global router, on their own registry (appended to the app's /metrics)."""

    def __init__(self, replica: str = "", router_replicas: int = 1) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        from llmstack.serve.http.metrics import LATENCY_BUCKETS

        r = self.registry = CollectorRegistry()
        labels = ["region", "model", "adapter"]
        self.cost = Counter("llmstack_region_cost_dollars", "Measured cost of answers: replica-seconds x price",
                            labels, registry=r)
        self.replica_seconds = Counter("llmstack_region_replica_seconds", "Replica time used by answers",
                                       labels, registry=r)
        self.prompt_tokens = Counter("llmstack_region_prompt_tokens", "Prompt tokens served", labels, registry=r)
        self.completion_tokens = Counter("llmstack_region_completion_tokens", "Tokens generated", labels,
                                         registry=r)
        self.requests = Counter("llmstack_region_requests", "Attempts per region by outcome (ok, failed, "
                                "client_error, cancelled)", ["region", "outcome"], registry=r)
        self.retries = Counter("llmstack_region_retries", "Requests retried on another region after a failure",
                               ["from_region", "to_region"], registry=r)
        self.resumed = Counter("llmstack_region_resumed_streams", "Started streams continued on another region "
                               "after the tokens they had delivered, their region having failed",
                               ["from_region", "to_region"], registry=r)
        self.slo_missed = Counter("llmstack_region_slo_missed", "Requests routed although no region met the SLO",
                                  ["region"], registry=r)
        self.latency = Histogram("llmstack_region_latency_seconds", "Router-measured latency per region",
                                 ["region"], buckets=LATENCY_BUCKETS, registry=r)
        self.overhead = Histogram("llmstack_region_router_overhead_seconds",
                                  "Router time per request outside the backend call and the network offset",
                                  buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025), registry=r)
        self.healthy = Gauge("llmstack_region_healthy", "1 while the region takes traffic, 0 while ejected",
                             ["region"], registry=r)
        self.slo_unmet = Gauge("llmstack_region_slo_unmet", "1 while no healthy region meets the latency SLO",
                               registry=r)
        self.price = Gauge("llmstack_region_price_per_replica_hour", "Configured price", ["region"], registry=r)
        # which router replica answered this scrape (each counts its own requests) and how many there are
        Gauge(ROUTER_INFO, "This router replica, of router_replicas", ["replica", "router_replicas"],
              registry=r).labels(replica, str(router_replicas)).set(1)

    def answered(self, region: str, model: str, adapter: str, *, seconds: float, cost: float,
                 prompt_tokens: int, completion_tokens: int) -> None:
        self.cost.labels(region, model, adapter).inc(cost)
        self.replica_seconds.labels(region, model, adapter).inc(seconds)
        self.prompt_tokens.labels(region, model, adapter).inc(prompt_tokens)
        self.completion_tokens.labels(region, model, adapter).inc(completion_tokens)

    def render(self, router: Any) -> str:
        from prometheus_client import generate_latest

        for name, state in router.regions.items():
            self.healthy.labels(name).set(1 if state.healthy else 0)
            self.price.labels(name).set(state.price)
        self.slo_unmet.set(1 if router.slo_unmet() else 0)
        return generate_latest(self.registry).decode()


def parse_prometheus(text: str) -> list[tuple[str, dict[str, str], float]]:
    """(metric name, labels, value) of every sample in a Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    return [(s.name, dict(s.labels), float(s.value))
            for family in text_string_to_metric_families(text) for s in family.samples]


def cost_report(metrics_text: str | list[str]) -> dict[str, Any]:
    """Cost, tokens, tokens per dollar and cost per 1k tokens per region (and in total) from /metrics text
    (or several: one per router replica, summed).

    Example:
        >>> cost_report('llmstack_region_cost_dollars_total{region="a",model="m",adapter=""} 0.002\\n'
        ...             'llmstack_region_completion_tokens_total{region="a",model="m",adapter=""} 1000\\n')["total"]
        {'cost_usd': 0.002, 'tokens': 1000.0, 'requests': 0.0, 'tokens_per_dollar': 500000.0, 'usd_per_1k_tokens': 0.002}
    """
    rows: dict[str, dict[str, float]] = {}
    names = {"llmstack_region_cost_dollars_total": "cost_usd", "llmstack_region_prompt_tokens_total": "prompt",
             "llmstack_region_completion_tokens_total": "completion"}
    texts = [metrics_text] if isinstance(metrics_text, str) else metrics_text
    for name, labels, value in (sample for text in texts for sample in parse_prometheus(text)):
        region = labels.get("region")
        if region is None:
            continue
        row = rows.setdefault(region, {"cost_usd": 0.0, "prompt": 0.0, "completion": 0.0, "requests": 0.0})
        if name in names:
            row[names[name]] += value
        elif name == "llmstack_region_requests_total" and labels.get("outcome") == "ok":
            row["requests"] += value

    def summary(cost: float, tokens: float, requests: float) -> dict[str, Any]:
        return {"cost_usd": cost, "tokens": tokens, "requests": requests,
                "tokens_per_dollar": tokens / cost if cost > 0 else None,
                "usd_per_1k_tokens": cost / tokens * 1000 if tokens > 0 else None}

    regions = {name: summary(r["cost_usd"], r["prompt"] + r["completion"], r["requests"])
               for name, r in sorted(rows.items())}
    total = summary(sum(r["cost_usd"] for r in rows.values()),
                    sum(r["prompt"] + r["completion"] for r in rows.values()),
                    sum(r["requests"] for r in rows.values()))
    return {"regions": regions, "total": total, "router_replicas_read": len(texts)}


def router_of(metrics_text: str) -> tuple[str, int]:
    """(replica id, router replicas) of the router replica whose /metrics this is (("", 1) if not said)."""
    for name, labels, _ in parse_prometheus(metrics_text):
        if name == ROUTER_INFO:
            return labels.get("replica", ""), int(labels.get("router_replicas", "1"))
    return "", 1


def every_replica(fetch: Callable[[], str], *, tries_per_replica: int = 20) -> list[str]:
    """One /metrics text per router replica: ``fetch`` again (the proxy picks a replica per request) until
    each of the ``router_replicas`` has answered or the tries run out."""
    seen: dict[str, str] = {}
    want, tries = 1, 0
    while tries < tries_per_replica * want:
        tries += 1
        text = fetch()
        replica, want = router_of(text)
        seen[replica] = text
        if len(seen) >= want:
            break
    return list(seen.values())


def format_cost(report: dict[str, Any]) -> str:
    """A table of :func:`cost_report` for the ``llmstack cost`` CLI."""
    def fmt(v: Any, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    lines = [f"{'region':<16}{'requests':>10}{'tokens':>10}{'cost $':>14}{'tokens/$':>14}{'$/1k tokens':>14}"]
    for name, r in [*report["regions"].items(), ("TOTAL", report["total"])]:
        lines.append(f"{name:<16}{r['requests']:>10.0f}{r['tokens']:>10.0f}{fmt(r['cost_usd'], '.6f'):>14}"
                     f"{fmt(r['tokens_per_dollar'], '.0f'):>14}{fmt(r['usd_per_1k_tokens'], '.6f'):>14}")
    return "\n".join(lines)


def app_cost(url: str, *, api_key: str | None = None, timeout_s: float = 10.0) -> dict[str, Any]:
    """The :func:`cost_report` of a running multi-region app, read from its ``/metrics`` (every router
    replica's: each counts the requests it routed).

    Raises:
        LLMStackError: the app cannot be reached, or it has no region metrics (not a multi-region app).

    Example:
        >>> print(format_cost(app_cost("http://127.0.0.1:8000")))  # doctest: +SKIP
    """
    import urllib.error
    import urllib.request

    from llmstack.errors import LLMStackError

    def fetch() -> str:
        request = urllib.request.Request(url.rstrip("/") + "/metrics",
                                         headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310 - a user-given URL
                return response.read().decode("utf-8", "replace")
        except (urllib.error.URLError, OSError) as exc:
            raise LLMStackError(f"cannot read {url.rstrip('/')}/metrics: {getattr(exc, 'reason', exc)}") from None

    report = cost_report(every_replica(fetch))
    if not report["regions"]:
        raise LLMStackError(f"{url} has no per-region cost metrics: is it a multi-region app "
                            "(serve_configs/multi-region.yaml)?")
    return report
