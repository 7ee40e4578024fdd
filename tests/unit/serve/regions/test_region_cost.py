"""Cost accounting: replica-seconds from engine timing, dollars, and the `llmstack cost` report."""

from __future__ import annotations

import pytest

from llmstack.serve.protocol import Timing
from llmstack.serve.routing.cost import RegionMetrics, cost_report, dollars, format_cost, replica_seconds
from llmstack.serve.routing.region_policy import RegionRouter


def test_replica_seconds_share_the_batch_and_cache_is_free() -> None:
    assert replica_seconds(Timing(queue_s=0.5, total_s=2.5, batch_size=4)) == pytest.approx(0.5)
    assert replica_seconds(Timing(queue_s=0.0, total_s=1.0, batch_size=1), cached=True) == 0.0
    assert replica_seconds(None) == 0.0
    assert dollars(3600.0, 2.0) == pytest.approx(2.0)


def test_metrics_render_and_report_round_trip() -> None:
    metrics = RegionMetrics()
    router = RegionRouter({"a": {"price_per_replica_hour": 3.6, "capacity": 1},
                           "b": {"price_per_replica_hour": 1.0, "capacity": 1}}, {})
    metrics.answered("a", "tiny-lm", "", seconds=1.0, cost=dollars(1.0, 3.6), prompt_tokens=100,
                     completion_tokens=900)
    metrics.requests.labels("a", "ok").inc()
    metrics.answered("b", "tiny-lm", "lora-0", seconds=2.0, cost=dollars(2.0, 1.0), prompt_tokens=0,
                     completion_tokens=500)
    text = metrics.render(router)
    assert 'llmstack_region_healthy{region="a"} 1.0' in text
    report = cost_report(text)
    assert report["regions"]["a"]["cost_usd"] == pytest.approx(0.001)
    assert report["regions"]["a"]["usd_per_1k_tokens"] == pytest.approx(0.001)
    assert report["regions"]["a"]["requests"] == 1
    assert report["total"]["tokens"] == 1500
    assert report["total"]["tokens_per_dollar"] == pytest.approx(1500 / (0.001 + 2 / 3600))
    table = format_cost(report)
    assert "TOTAL" in table and "a" in table.splitlines()[1]


def test_report_of_an_app_without_region_metrics() -> None:
    report = cost_report("llmstack_requests_total{route=\"chat\",model=\"m\",status=\"200\"} 3\n")
    assert report["regions"] == {} and report["total"]["usd_per_1k_tokens"] is None


def test_cost_cli_sums_every_router_replicas_metrics(capsys: pytest.CaptureFixture[str]) -> None:
    import http.server
    import itertools
    import json
    import threading

    from llmstack.cli import main

    router = RegionRouter({"us-east": {"price_per_replica_hour": 2.0}}, {})
    bodies = []
    for replica, seconds in (("r1", 2.7), ("r2", 0.9)):  # two router replicas, each counting its own answers
        metrics = RegionMetrics(replica, router_replicas=2)
        metrics.answered("us-east", "tiny-lm", "", seconds=seconds, cost=dollars(seconds, 2.0), prompt_tokens=5,
                         completion_tokens=495)
        bodies.append(metrics.render(router).encode())
    answers = itertools.cycle([bodies[0], bodies[0], bodies[1]])  # the proxy's pick: not strictly alternating

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200 if self.path == "/metrics" else 404)
            self.end_headers()
            self.wfile.write(next(answers))

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        assert main(["cost", "--url", url, "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["router_replicas_read"] == 2 and report["total"]["tokens"] == 1000
        assert report["regions"]["us-east"]["usd_per_1k_tokens"] == pytest.approx(0.002)
        assert main(["cost", "--url", url]) == 0
        assert "us-east" in capsys.readouterr().out
    finally:
        server.shutdown()
    assert main(["cost", "--url", "http://127.0.0.1:1"]) == 2
    assert "cannot read" in capsys.readouterr().err
