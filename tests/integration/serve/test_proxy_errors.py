"""An ingress replica's process killed under load: every answer is a 200 or an OpenAI error, never Ray's plain
text (real Ray, real HTTP; the proxy runs llmstack's middleware, serve/http/proxy_errors.py).

Two ingress replicas in front of one paced model replica (each token waits a little, so requests are surely in
flight at the ingress when it dies). Requests on the killed ingress that had not started answering are replayed
on the other one and succeed; a stream that had begun ends with an error event and ``[DONE]``.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests
from serve_helpers import deploy_paced_app


pytestmark = pytest.mark.ray

APP = "proxyerr-it"
REQUESTS = 32
BODY = {"model": "tiny-lm@production", "prompt": "line 1:", "max_tokens": 6, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def two_ingress_app(serve_registry: dict[str, Any], serve_port: int) -> Iterator[str]:
    """Two ingress replicas, one paced model replica (0.1 s a token); yields the base URL."""
    from ray import serve

    url = deploy_paced_app(serve_registry, serve_port, APP, model_replicas=1, delay_s=0.1, ingress_replicas=2)
    try:
        yield url
    finally:
        serve.delete(APP)


def _kill_a_busy_ingress(timeout_s: float = 20) -> None:
    """SIGKILL the process of an ingress replica that has requests in flight."""
    import ray

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        for actor in ray.util.list_named_actors(all_namespaces=True):
            if not actor["name"].startswith(f"SERVE_REPLICA::{APP}#OpenAIIngress#"):
                continue
            replica = ray.get_actor(actor["name"], namespace=actor["namespace"])
            if ray.get(replica.get_num_ongoing_requests.remote(), timeout=10) >= 2:
                os.kill(ray.get(replica.__ray_call__.remote(lambda _: os.getpid()), timeout=10), signal.SIGKILL)
                return
        time.sleep(0.05)
    raise AssertionError("no ingress replica had requests in flight")


def _request(url: str, streamed: bool) -> dict[str, Any]:
    """One request's status, content type, replay header and body (a stream's ``data:`` payloads)."""
    with requests.post(url + "/v1/completions", json={**BODY, "stream": streamed}, stream=streamed,
                       timeout=60) as response:
        answer = {"status": response.status_code, "type": response.headers.get("content-type", ""),
                  "retry_after": response.headers.get("retry-after"), "streamed": streamed,
                  "replayed": response.headers.get("x-llmstack-replayed")}
        if answer["type"].startswith("text/event-stream"):
            answer["events"] = [line[6:] for line in response.iter_lines(decode_unicode=True)
                                if line and line.startswith("data: ")]
        else:
            answer["text"] = response.text
        return answer


def test_a_killed_ingress_costs_no_request_and_no_plain_text(two_ingress_app: str) -> None:
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(_request, two_ingress_app, i % 2 == 1) for i in range(REQUESTS)]
        _kill_a_busy_ingress()
        answers = [f.result() for f in futures]
    cut_streams = 0
    for answer in answers:
        if answer["status"] == 200 and "events" in answer:  # a stream: ends with [DONE], errors as events
            events = answer["events"]
            assert events[-1] == "[DONE]", answer
            errors = [json.loads(e)["error"] for e in events[:-1] if "error" in json.loads(e)]
            assert all(e["code"] == "replica_lost" for e in errors), answer
            cut_streams += bool(errors)
            continue
        assert answer["type"] == "application/json", answer  # never Ray's or uvicorn's plain text
        payload = json.loads(answer["text"])
        if answer["status"] != 200:
            assert set(payload["error"]) == {"message", "type", "param", "code"}, answer
            assert answer["status"] != 503 or answer["retry_after"], answer
    # two ingress replicas: a request the killed one had not answered yet was replayed on the other and succeeded
    assert [a["status"] for a in answers if not a["streamed"]] == [200] * (REQUESTS // 2), answers
    replayed = [a for a in answers if a["replayed"]]
    print(f"{len(replayed)} replayed, {cut_streams} cut streams of {REQUESTS}")  # shown with -rP
    assert replayed or cut_streams, "the kill met no request in flight"
    assert all(a["status"] == 200 for a in replayed), replayed
