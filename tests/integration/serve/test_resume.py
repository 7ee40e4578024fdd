"""A replica killed while it serves a request: the request continues on the other replica (real Ray, real HTTP).

The model deployment is paced (``llmstack.serve._faults``: each streamed chunk waits a little) so the request is
surely in flight when the replica serving it is killed; the answer must equal an uninterrupted greedy run's.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from serve_helpers import deploy_paced_app


pytestmark = pytest.mark.ray

APP = "resume-it"
MAX_TOKENS = 24
BODY = {"model": "tiny-lm@production", "prompt": "line 1: the value of x is", "max_tokens": MAX_TOKENS,
        "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def paced_app(serve_registry: dict[str, Any], serve_port: int) -> Iterator[str]:
    """Two paced model replicas (0.15 s per streamed chunk) behind the OpenAI ingress; yields the base URL."""
    from ray import serve

    yield deploy_paced_app(serve_registry, serve_port, APP, model_replicas=2, delay_s=0.15)
    serve.delete(APP)


def _replicas() -> list[Any]:
    import ray

    names = [a for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith(f"SERVE_REPLICA::{APP}#LLMServer#")]
    return [ray.get_actor(a["name"], namespace=a["namespace"]) for a in names]


def _kill_the_busy_replica(timeout_s: float = 60) -> None:
    """Kill the model replica with a request in flight (the ingress keeps running)."""
    import ray

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        for replica in _replicas():
            try:
                busy = ray.get(replica.get_num_ongoing_requests.remote(), timeout=10)
            except Exception:  # noqa: BLE001 - a replica that is starting or already gone
                continue
            if busy:
                ray.kill(replica, no_restart=True)
                return
        time.sleep(0.05)
    raise AssertionError("no model replica had a request in flight")


def _wait_for_two_replicas(timeout_s: float = 120) -> None:
    from ray import serve

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        states = serve.status().applications[APP].deployments["LLMServer"].replica_states
        if states.get("RUNNING", 0) >= 2:
            return
        time.sleep(0.5)
    raise AssertionError("the killed replica was not replaced")


def _streamed(url: str, *, kill_after: int | None = None) -> tuple[str, dict[str, Any]]:
    """The text and usage of one streamed greedy request; ``kill_after``: kill its replica after that many events."""
    events: list[Any] = []
    body = {**BODY, "stream": True, "stream_options": {"include_usage": True}}
    with requests.post(url + "/v1/completions", json=body, stream=True, timeout=180) as response:
        assert response.status_code == 200, response.text
        for line in response.iter_lines(decode_unicode=True):
            if not line or not line.startswith("data: "):
                continue
            payload = line[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
            if kill_after is not None and len(events) == kill_after:
                _kill_the_busy_replica()
    assert events[-1] == "[DONE]", events[-3:]
    assert not any("error" in e for e in events[:-1] if isinstance(e, dict)), events
    text = "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"])
    return text, events[-2]["usage"]


def _resumed_total(url: str) -> float:
    text = requests.get(url + "/metrics", timeout=30).text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("llmstack_resumed_requests_total"))


def _wait_for_resumed(url: str, at_least: float, timeout_s: float = 60) -> float:
    """The cluster-wide count of resumed requests once it reaches ``at_least`` (Ray exports metrics periodically)."""
    deadline = time.time() + timeout_s
    seen = _resumed_total(url)
    while seen < at_least and time.time() < deadline:
        time.sleep(1)
        seen = _resumed_total(url)
    return seen


def test_a_stream_whose_replica_is_killed_continues_token_identical(paced_app: str) -> None:
    whole_text, whole_usage = _streamed(paced_app)
    assert whole_usage["completion_tokens"] == MAX_TOKENS
    text, usage = _streamed(paced_app, kill_after=5)
    assert text == whole_text
    assert usage == whole_usage  # the original prompt's tokens, every token delivered counted once
    assert _wait_for_resumed(paced_app, 1) >= 1
    _wait_for_two_replicas()


def test_a_non_streamed_request_whose_replica_is_killed_is_answered(paced_app: str) -> None:
    body = {**BODY, "max_tokens": 12}
    whole = requests.post(paced_app + "/v1/completions", json=body, timeout=180)
    assert whole.status_code == 200, whole.text
    before = _resumed_total(paced_app)
    answer: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: answer.update(
        response=requests.post(paced_app + "/v1/completions", json=body, timeout=180)))
    thread.start()
    _kill_the_busy_replica()
    thread.join(timeout=200)
    response = answer["response"]
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"] == whole.json()["choices"][0]["text"]
    assert response.json()["usage"] == whole.json()["usage"]
    assert _wait_for_resumed(paced_app, before + 1) >= before + 1
    _wait_for_two_replicas()


def _family_total(url: str, family: str) -> float | None:
    """The sum of ``family``'s samples in the cluster's /metrics (None: the family is absent)."""
    lines = [line for line in requests.get(url + "/metrics", timeout=30).text.splitlines()
             if line.startswith(family + "{") or line.startswith(family + " ")]
    return sum(float(line.split()[-1]) for line in lines) if lines else None


def test_a_stream_the_client_leaves_and_the_replica_gauges_reach_the_cluster_metrics(paced_app: str) -> None:
    """Through Ray's metrics agents: the abort (with its tokens) and the model replicas' gauges under vLLM's names."""
    before = _family_total(paced_app, "llmstack_requests_aborted_total") or 0.0
    with requests.post(paced_app + "/v1/completions", json={**BODY, "stream": True}, stream=True,
                       timeout=180) as response:
        assert response.status_code == 200
        for i, _ in enumerate(line for line in response.iter_lines() if line):
            if i == 2:
                break  # the client leaves after three events
    deadline = time.time() + 60  # the ingress notices the disconnect; agents export every few seconds
    while time.time() < deadline and (_family_total(paced_app, "llmstack_requests_aborted_total") or 0) <= before:
        time.sleep(1)
    assert (_family_total(paced_app, "llmstack_requests_aborted_total") or 0) == before + 1
    assert (_family_total(paced_app, "llmstack_aborted_completion_tokens_total") or 0) >= 3
    deadline = time.time() + 60
    while time.time() < deadline and _family_total(paced_app, "vllm:gpu_cache_usage_perc") is None:
        time.sleep(1)
    usage = _family_total(paced_app, "vllm:gpu_cache_usage_perc")
    waiting = _family_total(paced_app, "vllm:num_requests_waiting")
    assert usage is not None and 0 <= usage <= 1, usage  # the mean over the replicas, idle or not
    assert waiting is not None and waiting >= 0, waiting
