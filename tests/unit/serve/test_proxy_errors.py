"""The proxy's error middleware (serve/http/proxy_errors.py) around small ASGI apps that answer as Ray's proxy does.

Each app below reproduces one thing Ray Serve's proxy does (read in ray/serve/_private/proxy.py and http_util.py):
it returns without a response when the ingress replica is lost (uvicorn would write a plain-text 500), writes
plain-text errors, or stops a started stream. llmstack's own app must pass through message for message.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from llmstack._ray import PROXY_CALLBACK, PROXY_PROBE_PATH, serve_controller_options
from llmstack.serve.http import make_api
from llmstack.serve.http.proxy_errors import REPLAYED_HEADER, REPLICA_LOST, ProxyErrors, proxy_middlewares

sys.path.insert(0, str(Path(__file__).parent))
from test_ingress import SlowEngine  # noqa: E402

Message = dict[str, Any]


def _scope(method: str = "POST", path: str = "/app/v1/completions") -> dict[str, Any]:
    return {"type": "http", "method": method, "path": path, "root_path": "", "query_string": b"",
            "headers": [(b"content-type", b"application/json")], "http_version": "1.1"}


async def _call(app: Any, scope: dict[str, Any], body: bytes = b"", *, chunks: int = 1) -> list[Message]:
    """Run ``app`` on one request (``body`` sent in ``chunks`` messages); the messages it sends to the client."""
    size = max(1, -(-len(body) // chunks))
    incoming: list[Message] = [{"type": "http.request", "body": body[i:i + size], "more_body": i + size < len(body)}
                               for i in range(0, max(len(body), 1), size)]
    sent: list[Message] = []
    done = asyncio.Event()

    async def receive() -> Message:
        if incoming:
            return incoming.pop(0)
        await done.wait()  # the client stays connected until the response is complete
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            done.set()

    await app(scope, receive, send)
    done.set()
    return sent


def _status(sent: list[Message]) -> int:
    return sent[0]["status"]


def _headers(sent: list[Message]) -> dict[str, str]:
    return {k.decode().lower(): v.decode() for k, v in sent[0]["headers"]}


def _body(sent: list[Message]) -> bytes:
    return b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def _complete(sent: list[Message]) -> bool:
    return sent[-1]["type"] == "http.response.body" and not sent[-1].get("more_body", False)


async def _json_echo(scope: dict[str, Any], receive: Any, send: Any) -> None:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body", False):
            break
    payload = json.dumps({"echo": body.decode()}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": payload, "more_body": False})


class LosesReplicas:
    """Ray's proxy when the ingress replica is lost ``lost`` times: it reads the request, then returns without a
    response (send_http_response_on_exception sends nothing for a 500); afterwards it answers (echo)."""

    def __init__(self, lost: int) -> None:
        self.lost = lost
        self.calls = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.calls += 1
        if self.calls <= self.lost:
            await receive()
            return
        await _json_echo(scope, receive, send)


def _ray_text(status: int, text: str, extra: list[tuple[bytes, bytes]] = ()) -> Any:
    """Ray's proxy writing its own error (convert_object_to_asgi_messages of a string)."""
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": [[b"content-type", b"text/plain; charset=utf-8"], *map(list, extra)]})
        await send({"type": "http.response.body", "body": text.encode(), "more_body": False})
    return app


async def _untyped_503(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The ingress replica's own load shedding (replica.handle_exception): a 503 without any content type."""
    await send({"type": "http.response.start", "status": 503, "headers": [(b"content-length", b"33")]})
    await send({"type": "http.response.body", "body": b"Request dropped due to backpressure", "more_body": False})


def _cut_stream(*, raises: bool) -> Any:
    """A stream whose ingress replica dies after two events: the proxy stops (or raises) mid-body."""
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8")]})
        for i in range(2):
            await send({"type": "http.response.body", "body": f'data: {{"n": {i}}}\n\n'.encode(), "more_body": True})
        if raises:
            raise RuntimeError("the replica died")
    return app


def _error(sent: list[Message]) -> dict[str, Any]:
    assert _headers(sent)["content-type"] == "application/json"
    payload = json.loads(_body(sent))
    assert set(payload) == {"error"} and set(payload["error"]) == {"message", "type", "param", "code"}, payload
    return payload["error"]


# ----------------------------------------------------------------------------- (a) non-JSON errors


def test_a_request_whose_replica_stays_lost_is_an_openai_503_with_retry_after() -> None:
    inner = LosesReplicas(lost=99)
    sent = asyncio.run(_call(ProxyErrors(inner, retry_delay_s=0), _scope(), b'{"prompt": "x"}'))
    assert _status(sent) == 503 and _headers(sent)["retry-after"] == "1"
    assert _error(sent)["code"] == REPLICA_LOST
    assert inner.calls == 3 and _complete(sent)


@pytest.mark.parametrize(("status", "text", "extra", "want_status", "want_code", "want_retry"), [
    (503, "Request dropped due to backpressure (num_queued_requests=4, max_queued_requests=4).",
     [(b"retry-after", b"3")], 503, "overloaded", "3"),
    (503, "Deployment 'x' is unavailable.", [], 503, "unavailable", "1"),
    (408, "Request 7a timed out after 5.0s.", [], 504, "timeout", None),
    (404, "Path '/nothing' not found. Ping http://.../-/routes for available routes.", [], 404, "not_found", None),
    (500, "Internal Server Error", [], 500, "internal_error", None),
])
def test_ray_plain_text_errors_become_the_openai_shape(status: int, text: str, extra: list[tuple[bytes, bytes]],
                                                      want_status: int, want_code: str,
                                                      want_retry: str | None) -> None:
    sent = asyncio.run(_call(ProxyErrors(_ray_text(status, text, extra)), _scope("GET", "/nothing")))
    assert _status(sent) == want_status
    assert _error(sent)["code"] == want_code
    assert _headers(sent).get("retry-after") == want_retry
    assert _complete(sent)


def test_a_503_without_content_type_gets_the_openai_shape_and_a_retry_after() -> None:
    sent = asyncio.run(_call(ProxyErrors(_untyped_503), _scope()))
    assert _status(sent) == 503 and _headers(sent)["retry-after"] == "1"
    error = _error(sent)
    assert error["code"] == "overloaded" and error["type"] == "server_overloaded"


# ----------------------------------------------------------------------------- (b) replay


def test_a_request_whose_replica_was_lost_is_replayed_with_its_body() -> None:
    inner = LosesReplicas(lost=2)
    body = json.dumps({"prompt": "p" * 5000}).encode()
    sent = asyncio.run(_call(ProxyErrors(inner, retry_delay_s=0), _scope(), body, chunks=3))
    assert _status(sent) == 200 and inner.calls == 3 and _headers(sent)[REPLAYED_HEADER] == "2"
    assert json.loads(_body(sent))["echo"] == body.decode()


def test_only_requests_without_side_effects_are_replayed() -> None:
    inner = LosesReplicas(lost=1)
    sent = asyncio.run(_call(ProxyErrors(inner, retry_delay_s=0), _scope("POST", "/app/canary/promote"), b"{}"))
    assert inner.calls == 1 and _status(sent) == 503 and _error(sent)["code"] == REPLICA_LOST
    inner = LosesReplicas(lost=1)
    sent = asyncio.run(_call(ProxyErrors(inner, retry_delay_s=0), _scope("GET", "/app/v1/models")))
    assert inner.calls == 2 and _status(sent) == 200


def test_a_client_that_left_is_not_answered_or_replayed() -> None:
    inner = LosesReplicas(lost=99)

    async def main() -> list[Message]:
        sent: list[Message] = []
        messages = [{"type": "http.request", "body": b"{}", "more_body": False}, {"type": "http.disconnect"}]

        async def receive() -> Message:
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            sent.append(message)

        async def proxy(scope: dict[str, Any], receive: Any, send: Any) -> None:  # reads until the disconnect
            inner.calls += 1
            while (await receive())["type"] != "http.disconnect":
                pass

        await ProxyErrors(proxy, retry_delay_s=0)(_scope(), receive, send)
        return sent

    assert asyncio.run(main()) == [] and inner.calls == 1


# ----------------------------------------------------------------------------- (c) cut streams


@pytest.mark.parametrize("raises", [False, True])
def test_a_cut_stream_ends_with_an_error_event_and_done(raises: bool) -> None:
    sent = asyncio.run(_call(ProxyErrors(_cut_stream(raises=raises)), _scope()))
    assert _status(sent) == 200 and _complete(sent)
    events = [line[6:] for line in _body(sent).decode().splitlines() if line.startswith("data: ")]
    assert events[:2] == ['{"n": 0}', '{"n": 1}']
    assert json.loads(events[2])["error"]["code"] == REPLICA_LOST
    assert events[3:] == ["[DONE]"]


# ----------------------------------------------------------------------------- pass-through


def _recorded(app: Any) -> tuple[Any, list[Message]]:
    """``app`` with the messages it sends recorded (what the middleware received from it)."""
    inner_sent: list[Message] = []

    async def recording(scope: dict[str, Any], receive: Any, send: Any) -> None:
        async def record(message: Message) -> None:
            inner_sent.append(json.loads(json.dumps(message, default=lambda b: b.decode())))
            await send(message)
        await app(scope, receive, record)
    return recording, inner_sent


@pytest.mark.parametrize(("method", "path", "body", "status"), [
    ("POST", "/v1/completions", {"model": "slow", "prompt": "x"}, 200),
    ("POST", "/v1/completions", {"model": "slow", "prompt": "x", "stream": True}, 200),  # a whole SSE stream
    ("POST", "/v1/completions", {"model": "other", "prompt": "x"}, 404),  # llmstack's JSON errors
    ("POST", "/v1/completions", {"model": "slow", "prompt": "x", "max_tokens": -1}, 400),
    ("GET", "/v1/models", None, 200),
    ("GET", "/metrics", None, 200),  # text/plain
])
def test_llmstack_responses_pass_through_untouched(method: str, path: str, body: dict[str, Any] | None,
                                                  status: int) -> None:
    inner, inner_sent = _recorded(make_api(SlowEngine(delay=0.01)))
    sent = asyncio.run(_call(ProxyErrors(inner), _scope(method, path), json.dumps(body).encode() if body else b""))
    assert json.loads(json.dumps(sent, default=lambda b: b.decode())) == inner_sent
    assert _status(sent) == status and _complete(sent)
    if body and body.get("stream"):
        assert _body(sent).endswith(b"data: [DONE]\n\n")


def test_ray_endpoints_pass_through_and_the_probe_answers() -> None:
    sent = asyncio.run(_call(ProxyErrors(_ray_text(503, "This node is being drained.")), _scope("GET", "/-/healthz")))
    assert _status(sent) == 503 and _body(sent) == b"This node is being drained."
    sent = asyncio.run(_call(ProxyErrors(LosesReplicas(lost=99)), _scope("GET", PROXY_PROBE_PATH)))
    assert _status(sent) == 200 and json.loads(_body(sent)) == {"middleware": PROXY_CALLBACK}


def test_the_callback_ray_calls_gives_this_middleware() -> None:
    import importlib

    from starlette.middleware import Middleware

    env = serve_controller_options(environ={})["runtime_env"]["env_vars"]
    module, _, name = env["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"].partition(":")
    callback = getattr(importlib.import_module(module), name)
    assert callback is proxy_middlewares
    middlewares = callback()
    assert [type(m) for m in middlewares] == [Middleware] and middlewares[0].cls is ProxyErrors
    assert serve_controller_options(environ={"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "mine:cb"}) == {
        "runtime_env": {"env_vars": {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "mine:cb"}}}


# ----------------------------------------------------------------------------- over real HTTP (uvicorn, as in Ray)


@pytest.fixture
def serve_over_http() -> Any:
    """``serve(app)`` runs ``app`` under uvicorn (the server Ray's proxy runs in) on a free port of this helper's
    range (30500-30599) and returns the port."""
    import socket
    import threading

    import uvicorn

    servers: list[tuple[Any, threading.Thread]] = []

    def serve(app: Any) -> int:
        for port in range(30500, 30600):
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) != 0:
                    break
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            thread.join(0.01)
        servers.append((server, thread))
        return port

    yield serve
    for server, thread in servers:
        server.should_exit = True
        thread.join(5)


def test_over_http_a_lost_replica_is_json_and_deploy_tells_a_proxy_without_the_middleware(
        serve_over_http: Any) -> None:
    import httpx

    from llmstack._ray import check_proxy_errors

    bare = serve_over_http(LosesReplicas(lost=99))
    response = httpx.post(f"http://127.0.0.1:{bare}/app/v1/completions", json={"prompt": "x"})
    assert response.status_code == 500 and response.headers["content-type"].startswith("text/plain")  # uvicorn's
    with pytest.warns(UserWarning, match="without llmstack's proxy middleware"):
        assert check_proxy_errors("127.0.0.1", bare) is False

    wrapped = serve_over_http(ProxyErrors(LosesReplicas(lost=99), retry_delay_s=0))
    response = httpx.post(f"http://127.0.0.1:{wrapped}/app/v1/completions", json={"prompt": "x"})
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert response.json()["error"]["code"] == REPLICA_LOST
    assert check_proxy_errors("127.0.0.1", wrapped) is True
