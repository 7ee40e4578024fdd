"""The shared closed-loop load generator against a tiny local HTTP server (no Ray, no model)."""

from __future__ import annotations

import http.server
import json
import math
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from llmstack.serve.loadgen import CompletionLoad, percentile, post_completion, summarize


class _Handler(http.server.BaseHTTPRequestHandler):
    """Echoes the prompt as the completion; ``fail`` in the prompt answers 503 with an OpenAI error body."""

    bodies: list[dict[str, Any]] = []

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).bodies.append(body)
        if "fail" in body["prompt"]:
            payload = json.dumps({"error": {"message": "busy", "type": "overloaded", "code": "overloaded"}}).encode()
            self.send_response(503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        if body.get("stream"):
            events = [{"choices": [{"text": word}]} for word in body["prompt"].split()]
            payload = "".join(f"data: {json.dumps(e)}\n\n" for e in events).encode() + b"data: [DONE]\n\n"
            content_type = "text/event-stream"
        else:
            payload = json.dumps({"choices": [{"text": body["prompt"]}],
                                  "usage": {"completion_tokens": body["max_tokens"]}}).encode()
            content_type = "application/json"
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("x-llmstack-version", "v7")
        self.send_header("x-llmstack-region", "eu-west")
        self.send_header("x-llmstack-cost-usd", "0.25")
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture()
def server_url() -> Iterator[str]:
    _Handler.bodies = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_post_completion_reads_body_headers_and_errors(server_url: str) -> None:
    with requests.Session() as session:
        ok = post_completion(session, server_url, {"prompt": "hello there", "max_tokens": 5})
        failed = post_completion(session, server_url, {"prompt": "fail now", "max_tokens": 5})
    assert (ok.status, ok.text, ok.tokens) == (200, "hello there", 5)
    assert (ok.version, ok.region, ok.cost, ok.retried) == ("v7", "eu-west", 0.25, False)
    assert ok.done >= ok.sent
    assert (failed.status, failed.error_code, failed.text) == (503, "overloaded", None)


def test_post_completion_streams_and_times_the_first_token(server_url: str) -> None:
    with requests.Session() as session:
        sample = post_completion(session, server_url, {"prompt": "a b c", "max_tokens": 3, "stream": True})
    assert (sample.status, sample.stream, sample.text, sample.tokens) == (200, True, "abc", 3)
    assert sample.ttft is not None and 0 <= sample.ttft <= sample.latency


def test_post_completion_without_a_server_is_status_zero() -> None:
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with requests.Session() as session:
        sample = post_completion(session, f"http://127.0.0.1:{port}", {"prompt": "x", "max_tokens": 1}, timeout=5)
    assert sample.status == 0


def test_completion_load_sends_requests_each_per_client_with_its_body(server_url: str) -> None:
    load = CompletionLoad(server_url, threads=3, requests_each=4, max_tokens=2, stream_threads=1,
                          prompt=lambda worker, n: f"w{worker} n{n}", extra={"model": "m"})
    load.start()
    load.wait(timeout=30)
    load.stop()
    assert len(load.samples) == 12 and not load.failed()
    assert sorted(b["prompt"] for b in _Handler.bodies) == sorted(f"w{w} n{n}" for w in range(3) for n in range(1, 5))
    assert all(b["model"] == "m" and b["max_tokens"] == 2 for b in _Handler.bodies)
    assert {b["prompt"].split()[0] for b in _Handler.bodies if b["stream"]} == {"w0"}  # the first client streams


def test_completion_load_runs_until_stopped_and_counts_failures(server_url: str) -> None:
    load = CompletionLoad(server_url, threads=2, prompt=lambda worker, n: "fail" if n % 2 else "fine")
    with load:
        while len(load.samples) < 10:
            threading.Event().wait(0.01)
    count = len(load.samples)
    threading.Event().wait(0.2)
    assert len(load.samples) == count  # nothing is sent after stop
    stats = summarize(load.samples, seconds=1.0)
    assert stats["requests"] == count and stats["failed"] == len(load.failed()) > 0
    assert stats["rps"] == count - stats["failed"]


def test_percentile_is_nearest_rank() -> None:
    assert percentile([5.0, 1.0, 3.0, 2.0, 4.0], 50) == 3.0
    assert percentile([1.0, 2.0], 95) == 2.0
    assert math.isnan(percentile([], 50))
