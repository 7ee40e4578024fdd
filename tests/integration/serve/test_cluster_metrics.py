"""/metrics across two ingress replicas: the cluster's totals through Ray's metrics system, so repeated
scrapes agree and add up to the requests sent (each replica's private registry alternated before)."""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from serve_helpers import deploy_app

pytestmark = pytest.mark.ray

REQUESTS = 24


def _total(text: str, sample: str, **labels: str) -> float:
    """Sum of ``sample``'s series whose labels include ``labels``."""
    total = 0.0
    for match in re.finditer(rf"^{re.escape(sample)}(?:{{([^}}]*)}})? (\S+)$", text, flags=re.M):
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match.group(2))
    return total


def test_two_ingress_replicas_serve_one_monotonic_total(serve_registry: dict, serve_port: int) -> None:
    app = deploy_app(serve_registry, serve_port, app_name="metrics2", route_prefix="/metrics2",
                     autoscaling={"min_replicas": 2, "max_replicas": 2})
    try:
        body = {"prompt": "line 1:", "max_tokens": 4}
        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(lambda _: requests.post(app.url + "/v1/completions", json=body,
                                                          timeout=120).status_code, range(REQUESTS)))
        assert codes == [200] * REQUESTS
        done = {"route": "completions", "status": "200"}
        deadline = time.time() + 90  # Ray's agents export every few seconds
        while _total(requests.get(app.url + "/metrics", timeout=30).text, "llmstack_requests_total", **done) \
                < REQUESTS:
            assert time.time() < deadline, "the cluster total never reached the requests sent"
            time.sleep(1)
        for _ in range(20):
            text = requests.get(app.url + "/metrics", timeout=30).text
            assert _total(text, "llmstack_requests_total", **done) == REQUESTS
            assert _total(text, "vllm:e2e_request_latency_seconds_count") == REQUESTS
            assert "vllm:num_requests_running" in text and "vllm:generation_tokens_total" in text
    finally:
        app.shutdown()
