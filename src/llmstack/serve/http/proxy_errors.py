"""Errors that Ray Serve's HTTP proxy writes itself, in llmstack's OpenAI shape: an ASGI middleware of the proxy.

Ray Serve's proxy answers some requests without llmstack's app: an ingress replica lost while it holds a
request (Ray sends nothing and uvicorn writes a plain-text 500), load shedding (a plain-text 503 "Request
dropped due to backpressure"), a path no app serves (plain-text 404), its own request timeout (408). A
stream whose ingress replica dies just stops, without an error event or ``data: [DONE]``.
:class:`ProxyErrors` wraps the proxy's ASGI app so that a client sees none of that:

- **replay**: a request whose ingress replica is lost before the first response byte is sent again (its
  body was buffered) up to ``attempts`` times in all (an answer then carries ``x-llmstack-replayed: <replays>``),
  else answered ``503 replica_lost`` + ``Retry-After``.
  Only requests without side effects are replayed: GET, HEAD, OPTIONS and the generation POSTs
  (:data:`REPLAYABLE_POSTS`); a canary operation is answered with the 503 at once.
- **error bodies**: an error response (status >= 400) whose body is not JSON becomes the OpenAI error
  ``{"error": {"message", "type", "param", "code"}}`` with a fitting status and code (:func:`proxy_error`);
  Ray's ``Retry-After`` is kept and every 503 has one.
- **cut streams**: a started ``text/event-stream`` response that ends without ``data: [DONE]`` (the ingress
  died) gets an SSE error event in llmstack's shape, then ``data: [DONE]``.

JSON responses, successful responses and Ray's own ``/-/`` endpoints pass through byte for byte. The
middleware answers one path itself, :data:`~llmstack._ray.PROXY_PROBE_PATH`: how llmstack tells that a running
Serve has it.

The proxy takes middlewares from the function named by ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` in the
proxy actor's environment: :func:`proxy_middlewares`. llmstack sets it on every Serve it starts
(:func:`llmstack._ray.start_serve`); for a cluster started by hand, set it at ``ray start --head``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from llmstack._ray import PROXY_CALLBACK, PROXY_PROBE_PATH
from llmstack.errors import RequestError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: POST paths (by their ending, after any route prefix) whose requests have no side effects: replayed.
REPLAYABLE_POSTS = ("/v1/completions", "/v1/chat/completions", "/v1/embeddings")
REPLAYABLE_METHODS = ("GET", "HEAD", "OPTIONS")
REPLAYED_HEADER = "x-llmstack-replayed"  # on an answer that came after replays: how many times it was sent again
REPLICA_LOST = "replica_lost"  # the error code of a request or stream whose ingress replica was lost
MAX_REPLAY_BYTES = 4 * 1024 * 1024  # a larger request body streams through unbuffered (and is not replayed)
MAX_ERROR_TEXT = 300  # characters of Ray's own error text quoted in the message

logger = logging.getLogger(__name__)


def replica_lost_error(*, retry_after_s: int = 1) -> RequestError:
    """The 503 of a request whose ingress replica was lost before it answered (after the replays)."""
    return RequestError("The server replica handling this request was lost before it answered; retry shortly.",
                        status_code=503, type="service_unavailable", code=REPLICA_LOST,
                        headers={"Retry-After": str(retry_after_s)})


def stream_cut_error() -> RequestError:
    """The SSE error event of a stream whose ingress replica was lost after the stream began."""
    return RequestError("The server replica streaming this response was lost before it finished; the tokens "
                        "sent so far are valid, retry for the rest.", status_code=503, type="service_unavailable",
                        code=REPLICA_LOST)


def proxy_error(status: int, text: str, *, path: str = "", retry_after: str | None = None) -> RequestError:
    """The OpenAI error for a non-JSON error response of Ray's proxy (``status``, its body ``text``).

    A 503 or 429 from load shedding is ``overloaded``; another 503 ``unavailable``; Ray's 408 (its request
    timeout ran out: the upstream did not answer in time) a 504 ``timeout``; a 404 ``not_found``; any other
    status keeps its number. Every 503 gets a ``Retry-After`` (Ray's, else 1 s).

    Example:
        >>> proxy_error(503, "Request dropped due to backpressure", retry_after="2").headers
        {'Retry-After': '2'}
        >>> proxy_error(408, "Request 1f timed out after 5.0s.").status_code
        504
    """
    said = " ".join(text.split())[:MAX_ERROR_TEXT]
    detail = f" (Ray Serve: {said})" if said else ""
    shed = "backpressure" in text.lower()
    if status in (429, 503) and shed:
        error = RequestError(f"The server is overloaded: too many requests are queued. Retry shortly.{detail}",
                             status_code=status, type="server_overloaded", code="overloaded")
    elif status == 503:
        error = RequestError(f"The service is unavailable right now; retry shortly.{detail}", status_code=503,
                             type="service_unavailable", code="unavailable")
    elif status == 408:
        error = RequestError(f"The request timed out before the server answered.{detail}", status_code=504,
                             type="timeout_error", code="timeout")
    elif status == 404:  # Ray's text only repeats the path
        error = RequestError(f"No application serves the path {path!r} on this server.", status_code=404,
                             type="not_found_error", code="not_found")
    elif status == 429:
        error = RequestError(f"Too many requests; retry shortly.{detail}", status_code=429,
                             type="rate_limit_error", code="rate_limited")
    elif status >= 500:
        error = RequestError(f"internal error{detail}", status_code=status, type="server_error",
                             code="internal_error")
    else:
        error = RequestError(said or f"HTTP {status}", status_code=status, type="invalid_request_error")
    if retry_after is not None:
        error.headers = {"Retry-After": retry_after}
    elif error.status_code == 503:
        error.headers = {"Retry-After": "1"}
    return error


def _header(headers: Any, name: bytes) -> str | None:
    for key, value in headers or ():
        if bytes(key).lower() == name:
            return bytes(value).decode("latin-1")
    return None


def _replayable(scope: Scope) -> bool:
    method = scope.get("method", "GET").upper()
    return method in REPLAYABLE_METHODS or (method == "POST" and str(scope.get("path", "")).rstrip("/").endswith(
        REPLAYABLE_POSTS))


class _Attempt:
    """One pass of a request through the proxy: what reached the client, and an error response held back."""

    def __init__(self, send: Send, *, replays: int = 0) -> None:
        self._send = send
        self.replays = replays
        self.started = False  # a response start went to the client
        self.complete = False  # ... and its last body message
        self.event_stream = False
        self.tail = b""  # the last bytes of a streamed body (does it end with [DONE]?)
        self.held: Message | None = None  # a non-JSON error response start, converted when its body is in
        self.held_body = bytearray()

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start" and not self.started and self.held is None:
            content_type = (_header(message.get("headers"), b"content-type") or "").lower()
            if int(message["status"]) >= 400 and "json" not in content_type:
                self.held = message
                return
            self.event_stream = content_type.startswith("text/event-stream")
            self.started = True
            if self.replays:
                extra = (REPLAYED_HEADER.encode(), str(self.replays).encode())
                message = {**message, "headers": [*message.get("headers", []), extra]}
        elif kind == "http.response.body" and self.held is not None:
            if len(self.held_body) < 64 * 1024:
                self.held_body += message.get("body", b"")
            return
        elif kind == "http.response.body" and self.started:
            if self.event_stream:
                self.tail = (self.tail + message.get("body", b""))[-64:]
            self.complete = not message.get("more_body", False)
        await self._send(message)


class ProxyErrors:
    """ASGI middleware of Ray Serve's HTTP proxy: replays requests of a lost ingress replica, and gives every
    error the proxy writes itself the OpenAI shape (see the module docstring).

    Args:
        app: the proxy's ASGI app.
        attempts: passes of one request through the proxy at most (the first one included).
        retry_delay_s: wait before the first replay, doubled for each next one (Serve's router learns of the
            lost replica meanwhile).
    """

    def __init__(self, app: ASGIApp, *, attempts: int = 3, retry_delay_s: float = 0.2) -> None:
        self.app = app
        self.attempts = max(1, attempts)
        self.retry_delay_s = retry_delay_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = str(scope.get("path", ""))
        if path == PROXY_PROBE_PATH:
            await _send_json(send, 200, {"middleware": PROXY_CALLBACK})
            return
        if path.startswith("/-/"):  # Ray's health and route endpoints: probes read them as Ray writes them
            await self.app(scope, receive, send)
            return
        await self._serve(scope, receive, send, path)

    async def _serve(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        body, whole = await _buffer_body(receive)
        if body[-1]["type"] == "http.disconnect":
            return
        client_left = False

        async def live_receive() -> Message:
            nonlocal client_left
            message = await receive()
            client_left = client_left or message["type"] == "http.disconnect"
            return message

        replayable = whole and _replayable(scope)
        for attempt in range(1, self.attempts + 1):
            sent = _Attempt(send, replays=attempt - 1)
            try:
                await self.app(dict(scope), _replay(body, live_receive), sent.send)
            except Exception:  # noqa: BLE001 - answered below like any cut response
                logger.warning("Ray Serve's proxy failed on %s %s", scope.get("method"), path, exc_info=True)
            if client_left:
                return
            if sent.held is not None:
                error = proxy_error(int(sent.held["status"]), bytes(sent.held_body).decode("utf-8", "replace"),
                                    path=path, retry_after=_header(sent.held.get("headers"), b"retry-after"))
                await _send_error(send, error)
                return
            if sent.started:
                if sent.event_stream and not sent.complete:
                    await _end_stream(send, done=sent.tail.rstrip().endswith(b"data: [DONE]"))
                return  # any other cut response cannot be mended: uvicorn closes the connection
            if not replayable or attempt == self.attempts:
                break
            logger.warning("Ray Serve's proxy got no answer for %s %s (the ingress replica was lost?); sending "
                           "it again (%d of %d)", scope.get("method"), path, attempt + 1, self.attempts)
            await asyncio.sleep(self.retry_delay_s * 2 ** (attempt - 1))
        await _send_error(send, replica_lost_error())


async def _buffer_body(receive: Receive) -> tuple[list[Message], bool]:
    """The request's body messages, read up to the last one (True) or until :data:`MAX_REPLAY_BYTES` (False:
    the rest is still to be received, so the request cannot be replayed)."""
    messages: list[Message] = []
    size = 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request" or not message.get("more_body", False):
            return messages, message["type"] == "http.request"
        size += len(message.get("body", b""))
        if size > MAX_REPLAY_BYTES:
            return messages, False


def _replay(body: list[Message], receive: Receive) -> Receive:
    """A ``receive`` that gives the buffered ``body`` messages again, then what the client sends next."""
    pending = list(body)

    async def replay_receive() -> Message:
        return pending.pop(0) if pending else await receive()

    return replay_receive


async def _send_json(send: Send, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
    body = json.dumps(payload).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _send_error(send: Send, error: RequestError) -> None:
    await _send_json(send, error.status_code, error.to_openai(), error.headers or None)


async def _end_stream(send: Send, *, done: bool) -> None:
    """End a cut event stream: llmstack's SSE error event and ``data: [DONE]`` (only the end when it has those)."""
    body = b"" if done else f"data: {json.dumps(stream_cut_error().to_openai())}\n\ndata: [DONE]\n\n".encode()
    await send({"type": "http.response.body", "body": body, "more_body": False})


def proxy_middlewares() -> list[Any]:
    """The callback Ray Serve's proxy calls (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``): its middlewares."""
    from starlette.middleware import Middleware

    return [Middleware(ProxyErrors)]


__all__ = ["REPLAYABLE_POSTS", "REPLAYED_HEADER", "REPLICA_LOST", "ProxyErrors", "proxy_error",
           "proxy_middlewares", "replica_lost_error", "stream_cut_error"]
