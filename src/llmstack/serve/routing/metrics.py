"""The routing layer's one metrics surface: each policy's Prometheus metrics, appended to the app's /metrics.

Canary metrics (``llmstack_canary_*``): per-version requests, outcomes, latency and TTFT counted by this
replica; weights, KPI gauges and transitions as the board last reported them (the same on every replica).
A canary inside a region labels its series with ``region`` as well. Region metrics (``llmstack_region_*``)
are :class:`~llmstack.serve.routing.cost.RegionMetrics`.
"""

from __future__ import annotations

from typing import Any

GAUGES = {"weight_percent": ("Traffic share of each version (percent)", None),
          "error_rate": ("5xx rate over the KPI window", "error_rate"),
          "bad_output_rate": ("Empty/degenerate output rate", "bad_output_rate"),
          "latency_p50_seconds": ("p50 latency over the window", "p50_s"),
          "latency_p95_seconds": ("p95 latency", "p95_s"),
          "ttft_p50_seconds": ("p50 time to first token", "ttft_p50_s"),
          "ttft_p95_seconds": ("p95 time to first token", "ttft_p95_s")}


class CanaryMetrics:
    """Prometheus metrics of the canaries routed by this replica (``in_regions``: label series by region too)."""

    def __init__(self, *, in_regions: bool = False) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        from llmstack.serve.http.metrics import LATENCY_BUCKETS

        self.in_regions = in_regions
        where = ["region"] if in_regions else []
        r = self.registry = CollectorRegistry()
        self.requests = Counter("llmstack_canary_requests", "Requests routed to each version", [*where, "version"],
                                registry=r)
        self.outcomes = Counter("llmstack_canary_outcomes", "Finished requests by version and outcome "
                                "(ok, error, bad_output; shadow=true for mirrored ones)",
                                [*where, "version", "outcome", "shadow"], registry=r)
        self.latency = Histogram("llmstack_canary_latency_seconds", "Router-measured latency per version",
                                 [*where, "version"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("llmstack_canary_ttft_seconds", "Time to first token per version", [*where, "version"],
                              buckets=LATENCY_BUCKETS, registry=r)

    def _labels(self, scope: str, *values: str) -> tuple[str, ...]:
        return (scope, *values) if self.in_regions else values

    def routed(self, scope: str, version: str) -> None:
        self.requests.labels(*self._labels(scope, version)).inc()

    def observe(self, scope: str, version: str, *, latency: float, ttft: float | None, error: bool, bad: bool,
                shadow: bool) -> None:
        outcome = "error" if error else "bad_output" if bad else "ok"
        self.outcomes.labels(*self._labels(scope, version, outcome, str(shadow).lower())).inc()
        if not error:
            self.latency.labels(*self._labels(scope, version)).observe(latency)
            if ttft is not None:
                self.ttft.labels(*self._labels(scope, version)).observe(ttft)

    def render(self, canaries: dict[str, Any]) -> str:
        """This replica's counters, then the board's gauges and transitions of each canary (scope -> engine)."""
        from prometheus_client import generate_latest

        lines = [generate_latest(self.registry).decode()]
        for metric, (help_text, key) in GAUGES.items():
            lines.append(f"# HELP llmstack_canary_{metric} {help_text}\n# TYPE llmstack_canary_{metric} gauge\n")
            for scope, engine in canaries.items():
                for name in engine.versions:
                    row = engine.rows.get(name, {})
                    value = engine.weights.get(name, 0.0) if key is None else row.get(key)
                    if value is not None:
                        lines.append(f"llmstack_canary_{metric}{{{self._label_text(scope, name)}}} {float(value)}\n")
        lines.append("# HELP llmstack_canary_transitions_total Canaries started and how they ended\n"
                     "# TYPE llmstack_canary_transitions_total counter\n")
        for scope, engine in canaries.items():
            for event, count in engine.transitions.items():
                where = f'region="{_label(scope)}",' if self.in_regions else ""
                lines.append(f'llmstack_canary_transitions_total{{{where}event="{_label(event)}"}} {float(count)}\n')
        return "".join(lines)

    def _label_text(self, scope: str, version: str) -> str:
        where = f'region="{_label(scope)}",' if self.in_regions else ""
        return f'{where}version="{_label(version)}"'


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')
