"""Helpers shared by the serving integration tests (imported by name: this directory is on sys.path)."""

from __future__ import annotations

import json
import socket
import time
from typing import Any

API_KEY = "test-key"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_config(**fields: Any) -> dict[str, Any]:
    """A ServeConfig dict from fields named by their key (``max_batch_size=1``), each put in its section
    (``engine.max_batch_size``) by the config's own table of where keys live."""
    from llmstack.config import MOVED_KEYS, ServeConfig, merge_sections

    config: dict[str, Any] = {}
    for key, value in fields.items():
        path = MOVED_KEYS[ServeConfig].get(key, key).split(".")
        for part in reversed(path):
            value = {part: value}
        config = merge_sections(config, value)
    return config


def deploy_app(registry: dict[str, Any], port: int, **overrides: Any) -> Any:
    """Deploy an llmstack app on the session's Serve instance and wait until its health route answers.

    ``overrides`` name config keys without their section (``api_key``, ``max_batch_size``): see serve_config.
    """
    import requests

    import llmstack

    config = serve_config(**{"model": "tiny-lm@production", "registry": registry["url"], "port": port,
                             "num_cpus": 0.5, "max_tokens_limit": 64, "default_max_tokens": 16, **overrides})
    deployment = llmstack.deploy(config)
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            if requests.get(deployment.url + "/health", timeout=5).status_code == 200:
                return deployment
        except requests.RequestException:
            pass
        time.sleep(0.2)
    deployment.shutdown()
    raise AssertionError("app did not become healthy")


def deploy_paced_app(registry: dict[str, Any], port: int, app: str, *, model_replicas: int, delay_s: float,
                     ingress_replicas: int | None = None) -> str:
    """The tiny model behind the OpenAI ingress with each streamed chunk ``delay_s`` late
    (``llmstack.serve._faults``: requests are surely in flight when a replica is killed), healthy; returns its
    base URL (the caller deletes ``app``). ``ingress_replicas`` None: as the config says."""
    from ray import serve

    from llmstack.serve._faults import FaultInjectingLLMServer
    from llmstack.serve._testing import wait_healthy
    from llmstack.serve.deployments.builder import ingress_options, resolve_config, server_options, to_dict
    from llmstack.serve.deployments.ingress import OpenAIIngress

    cfg = resolve_config(serve_config(model="tiny-lm@production", registry=registry["url"], port=port, app_name=app,
                                      route_prefix=f"/{app}", num_cpus=0.25, max_tokens_limit=64,
                                      response_cache_size=0))
    config = to_dict(cfg)
    server = serve.deployment(FaultInjectingLLMServer, name="LLMServer").options(
        **server_options(cfg, replicas=model_replicas)).bind(config, fault="paced", delay_s=delay_s)
    ingress = ingress_options(cfg) if ingress_replicas is None else {**ingress_options(cfg),
                                                                     "num_replicas": ingress_replicas}
    serve.run(OpenAIIngress.options(**ingress).bind(server, config), name=app, route_prefix=f"/{app}",
              blocking=False)
    url = f"http://127.0.0.1:{port}/{app}"
    try:
        wait_healthy(url)
    except TimeoutError:
        serve.delete(app)
        raise
    return url


def server_stats(app_name: str) -> dict[str, Any]:
    from ray import serve

    handle = serve.get_deployment_handle("LLMServer", app_name=app_name)
    return handle.stats.remote().result()


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}


def sse(response: Any) -> list[Any]:
    """The ``data:`` events of a server-sent-events response (JSON decoded; the final ``[DONE]`` as is)."""
    events = []
    for line in response.iter_lines(decode_unicode=True):
        if line and line.startswith("data: "):
            payload = line[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def streamed_chunks(url: str, body: dict[str, Any], headers: dict[str, str]) -> list[Any]:
    """POST ``body`` with ``stream: true``: checks it is an event stream ending in ``[DONE]`` that arrives in
    more than one chunk (token by token, not one blob), and returns the chunks."""
    import requests

    with requests.post(url, json={**body, "stream": True}, headers=headers, stream=True, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.text
        events = sse(r)
    assert events[-1] == "[DONE]"
    assert len(events) >= 3, events
    return events[:-1]
