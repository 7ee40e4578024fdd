"""Prometheus metrics of the canary router: per-version requests, outcomes, latency, TTFT, weights and KPIs."""

from __future__ import annotations

import time
from typing import Any

from llmstack.serve.canary.kpis import KPIWindow, Observation


class RouterMetrics:
    """Prometheus metrics of the router: per-version requests, errors, bad outputs, latency, TTFT, weights."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter as PCounter, Histogram

        from llmstack.serve.http.metrics import LATENCY_BUCKETS

        r = self.registry = CollectorRegistry()
        self.requests = PCounter("llmstack_canary_requests", "Requests routed to each version", ["version"],
                                 registry=r)
        self.outcomes = PCounter("llmstack_canary_outcomes", "Finished requests by version and outcome "
                                 "(ok, error, bad_output; shadow=true for mirrored ones)",
                                 ["version", "outcome", "shadow"], registry=r)
        self.latency = Histogram("llmstack_canary_latency_seconds", "Router-measured latency per version",
                                 ["version"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("llmstack_canary_ttft_seconds", "Time to first token per version", ["version"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.canaries = PCounter("llmstack_canary_transitions", "Canaries started and how they ended",
                                 ["event"], registry=r)

    def routed(self, name: str) -> None:
        self.requests.labels(name).inc()

    def observe(self, name: str, obs: Observation) -> None:
        outcome = "error" if obs.error else "bad_output" if obs.bad else "ok"
        self.outcomes.labels(name, outcome, str(obs.shadow).lower()).inc()
        if not obs.error:
            self.latency.labels(name).observe(obs.latency)
            if obs.ttft is not None:
                self.ttft.labels(name).observe(obs.ttft)

    def started(self) -> None:
        self.canaries.labels("started").inc()

    def ended(self, state: str) -> None:
        self.canaries.labels(state).inc()

    def render(self, router: Any) -> str:
        from prometheus_client import generate_latest

        lines = [generate_latest(self.registry).decode()]
        now = time.monotonic()
        window = router.cfg.thresholds.window_s
        gauges = {"weight_percent": "Traffic share of each version (percent)",
                  "error_rate": "5xx rate over the KPI window", "bad_output_rate": "Empty/degenerate output rate",
                  "latency_p50_seconds": "p50 latency over the window", "latency_p95_seconds": "p95 latency",
                  "ttft_p50_seconds": "p50 time to first token", "ttft_p95_seconds": "p95 time to first token"}
        keys = {"error_rate": "error_rate", "bad_output_rate": "bad_output_rate", "latency_p50_seconds": "p50_s",
                "latency_p95_seconds": "p95_s", "ttft_p50_seconds": "ttft_p50_s", "ttft_p95_seconds": "ttft_p95_s"}
        rows = {n: KPIWindow.summarize([o for o in v.kpi.window(0, now, window) if not o.shadow])
                for n, v in router.versions.items()}
        for metric, help_text in gauges.items():
            lines.append(f"# HELP llmstack_canary_{metric} {help_text}\n# TYPE llmstack_canary_{metric} gauge\n")
            for name in router.versions:
                value = router.weights.get(name, 0.0) if metric == "weight_percent" else rows[name][keys[metric]]
                if value is not None:
                    lines.append(f'llmstack_canary_{metric}{{version="{_label(name)}"}} {float(value)}\n')
        return "".join(lines)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')
