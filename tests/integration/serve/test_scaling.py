"""Backpressure (503 + Retry-After in the OpenAI shape) and queue-depth autoscaling up and back down."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from serve_helpers import deploy_app

pytestmark = pytest.mark.ray


def running_replicas(app_name: str) -> int:
    from ray import serve

    deployment = serve.status().applications[app_name].deployments["LLMServer"]
    return int(deployment.replica_states.get("RUNNING", 0))


def test_overload_sheds_with_503_and_retry_after(serve_registry: dict, serve_port: int) -> None:
    app = deploy_app(serve_registry, serve_port, app_name="bp", route_prefix="/bp", max_batch_size=1,
                     max_ongoing_requests=1, max_queued_requests=1, retry_after_s=2, response_cache_size=0)
    try:
        body = {"prompt": "line 1:", "max_tokens": 48, "temperature": 0.8}

        def call(i: int) -> requests.Response:  # every other one streamed: Ray once shed those in plain text
            return requests.post(app.url + "/v1/completions", json={**body, "stream": i % 2 == 1}, timeout=120)

        with ThreadPoolExecutor(16) as pool:
            responses = list(pool.map(call, range(16)))
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 503}, codes
        assert codes.count(503) >= 8 and codes.count(200) >= 1, codes
        for shed in (r for r in responses if r.status_code == 503):
            assert shed.headers["Retry-After"] == "2" and shed.headers.get("content-type") == "application/json"
            error = shed.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["code"] == "overloaded"
        streamed_shed = [r for i, r in enumerate(responses) if i % 2 == 1 and r.status_code == 503]
        metrics = requests.get(app.url + "/metrics", timeout=10).text
        shed_total = sum(float(line.split()[-1]) for line in metrics.splitlines()
                         if line.startswith("llmstack_requests_shed_total"))
        assert shed_total == codes.count(503), (shed_total, codes, len(streamed_shed))
        # The server is still up and serves the next request.
        assert requests.post(app.url + "/v1/completions", json=body, timeout=60).status_code == 200
    finally:
        app.shutdown()


def test_scales_up_under_load_then_down(serve_registry: dict, serve_port: int) -> None:
    app = deploy_app(serve_registry, serve_port, app_name="auto", route_prefix="/auto", max_batch_size=2,
                     max_ongoing_requests=4, max_queued_requests=-1, response_cache_size=0,
                     autoscaling={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
                                  "upscale_delay_s": 0.5, "downscale_delay_s": 2, "look_back_period_s": 2,
                                  "metrics_interval_s": 0.5})
    stop = threading.Event()
    codes: list[int] = []

    def load() -> None:
        while not stop.is_set():
            r = requests.post(app.url + "/v1/completions", json={"prompt": "x", "max_tokens": 24,
                                                                 "temperature": 0.9}, timeout=120)
            codes.append(r.status_code)

    threads = [threading.Thread(target=load, daemon=True) for _ in range(6)]
    try:
        assert running_replicas("auto") == 1
        for t in threads:
            t.start()
        deadline = time.time() + 90
        while time.time() < deadline and running_replicas("auto") < 2:
            time.sleep(0.5)
        assert running_replicas("auto") == 2, "did not scale up under load"
        stop.set()
        for t in threads:
            t.join(timeout=120)
        deadline = time.time() + 90
        while time.time() < deadline and running_replicas("auto") > 1:
            time.sleep(0.5)
        assert running_replicas("auto") == 1, "did not scale back down when idle"
        assert codes and set(codes) == {200}
    finally:
        stop.set()
        app.shutdown()


def test_two_model_replicas_get_two_ingress_replicas_and_survive_losing_one(serve_registry: dict,
                                                                           serve_port: int) -> None:
    """min_replicas >= 2 asks for redundancy: the ingress gets it too, so killing one ingress replica
    leaves the other answering instead of a ~10 s restart with nothing in front of the model."""
    import ray
    from ray import serve
    from ray.util.state import list_actors

    app = deploy_app(serve_registry, serve_port, app_name="pair", route_prefix="/pair", response_cache_size=0,
                     autoscaling={"min_replicas": 2, "max_replicas": 2})
    try:
        ingress = serve.status().applications["pair"].deployments["OpenAIIngress"]
        assert ingress.replica_states.get("RUNNING") == 2
        victim = list_actors(filters=[("class_name", "=", "ServeReplica:pair:OpenAIIngress"),
                                      ("state", "=", "ALIVE")], address=ray.get_runtime_context().gcs_address)[0]
        os.kill(victim.pid, signal.SIGKILL)  # a crash, not a graceful stop
        body = {"prompt": "def add(a, b):", "max_tokens": 4, "temperature": 0}
        codes = []
        for _ in range(40):  # while the killed replica is noticed and replaced, the other one answers
            try:
                codes.append(requests.post(app.url + "/v1/completions", json=body, timeout=30).status_code)
            except requests.RequestException:
                codes.append(0)
            if codes[-5:] == [200] * 5:
                break
        assert codes[-5:] == [200] * 5, codes
        assert codes.count(200) >= len(codes) - 3, codes  # at most the requests already sent to the dead one
    finally:
        app.shutdown()
