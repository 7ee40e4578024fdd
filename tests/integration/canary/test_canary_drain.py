"""A canary app drains like a plain one, on the session's Ray cluster over real HTTP: once its drain board starts
(what SIGTERM to the deploying process does), new requests get 503 + Retry-After in the OpenAI shape and a
stream already running through the canary router finishes in full with ``[DONE]``; then the app is deleted."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from canary_helpers import VERSION_HEADER, wait_healthy

pytestmark = pytest.mark.ray

PACED = "paced"  # tiny-lm@v2 whose every streamed chunk waits DELAY_S: the stream is surely live while draining
DELAY_S = 0.2
TOKENS = 12  # ~2.4 s of stream, far inside the grace period
GRACE_S = 20.0


@pytest.fixture
def paced_canary(ray_cluster: dict, canary_registry: dict[str, Any]) -> Iterator[Any]:
    """stable tiny-lm@production (weight 0) beside a paced tiny-lm@v2 that takes every request, one router."""
    from llmstack.serve._testing import serve_http_port
    from llmstack.serve.canary import deploy_canary

    dep = deploy_canary({
        "stable": "tiny-lm@production", "registry": canary_registry["url"],
        "versions": [{"name": PACED, "model": "tiny-lm@v2",
                      "deployment": "llmstack.serve._faults:FaultInjectingLLMServer",
                      "deployment_args": {"fault": "paced", "delay_s": DELAY_S}}],
        "weights": {"stable": 0, PACED: 100}, "router_replicas": 1,
        "app_name": "canary-drain", "http": {"route_prefix": "/canary-drain", "port": serve_http_port(),
                                             "host": "127.0.0.1", "retry_after_s": 3, "request_timeout_s": 120},
        "engine": {"max_batch_size": 4, "batch_wait_timeout_s": 0.005, "response_cache_size": 0,
                   "max_tokens_limit": 64},
        "deployment": {"graceful_shutdown_timeout_s": GRACE_S, "ray_actor_options": {"num_cpus": 0.25}}})
    try:
        wait_healthy(dep.url)
        yield dep
    finally:
        dep.shutdown()


def _read_stream(url: str, body: dict[str, Any], started: threading.Event, out: dict[str, Any]) -> None:
    """Read one SSE stream to its end: its status, version header and data payloads (or what cut it)."""
    try:
        with requests.post(url, json=body, stream=True, timeout=120) as response:
            out["status"], out["version"] = response.status_code, response.headers.get(VERSION_HEADER)
            for line in response.iter_lines(decode_unicode=True):
                if line.startswith("data: "):
                    payload = line[6:]
                    out.setdefault("events", []).append(payload if payload == "[DONE]" else json.loads(payload))
                    started.set()
    except Exception as exc:  # noqa: BLE001 - a cut stream is what this test looks for
        out["error"] = exc
    finally:
        started.set()


def test_a_draining_canary_app_refuses_new_requests_and_finishes_its_live_stream(paced_canary: Any) -> None:
    from ray import serve

    base = paced_canary.url
    stream: dict[str, Any] = {}
    started = threading.Event()
    body = {"prompt": "line 1:", "max_tokens": TOKENS, "ignore_eos": True, "stream": True}
    reader = threading.Thread(target=_read_stream, args=(base + "/v1/completions", body, started, stream))
    reader.start()
    assert started.wait(60) and "events" in stream, stream

    drainer = threading.Thread(target=paced_canary.drain)  # blocks until the router is idle, then deletes the app
    drainer.start()
    refused = None
    deadline = time.monotonic() + 30
    while refused is None and time.monotonic() < deadline:  # until the drain shows: later requests are refused
        response = requests.post(base + "/v1/completions", json={"prompt": "x", "max_tokens": 1}, timeout=30)
        if response.status_code == 503:
            refused = response
        time.sleep(0.05)
    health = requests.get(base + "/health", timeout=30) if reader.is_alive() else None
    reader.join(timeout=60)
    drainer.join(timeout=GRACE_S + 30)

    assert refused is not None, "no request was refused with 503 while the canary app drained"
    error = refused.json()["error"]
    assert int(refused.headers["Retry-After"]) == 3 and error["code"] == "shutting_down"
    assert set(error) == {"message", "type", "param", "code"}
    if health is not None:  # asked while the stream still ran: a load balancer stops routing here
        assert health.status_code == 503 and health.json()["error"]["code"] == "shutting_down"
    assert "error" not in stream and stream["status"] == 200 and stream["version"] == PACED, stream
    events = stream["events"]
    assert events[-1] == "[DONE]", events[-3:]
    assert [e["choices"][0]["finish_reason"] for e in events[:-1]].count("length") == 1  # finished in full
    assert not any("error" in e for e in events[:-1])
    assert not drainer.is_alive() and "canary-drain" not in serve.status().applications  # drained, then deleted
