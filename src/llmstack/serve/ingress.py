"""The OpenAI-compatible HTTP layer. It knows only the engine protocol, never the model.

:func:`make_api` builds the FastAPI app around any :class:`~llmstack.serve.engine.EngineProtocol`:
a local :class:`~llmstack.serve.engine.TransformersEngine` (tests, notebooks) or
:class:`ServeEngineClient`, which forwards to a Serve deployment handle (the model deployment, or
a router in front of several versions: anything that implements ``generate``, ``stream``,
``abort``, ``check_health`` and ``models``).

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both stream with server-sent
events), ``GET /v1/models``, ``GET /health`` and ``GET /metrics``. Every error has the OpenAI shape
``{"error": {"message", "type", "param", "code"}}``; bad input is a 4xx, never a 5xx.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmstack.config import ServeConfig, load_config
from llmstack.serve.metrics import ServeMetrics
from llmstack.serve.protocol import (
    ChatChoice,
    ChatChoiceMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    EngineError,
    ErrorInfo,
    ErrorResponse,
    GenerationChunk,
    GenerationRequest,
    GenerationResult,
    ModelCard,
    ModelList,
    Usage,
    not_found,
)

MAX_PROMPTS = 32  # prompts in one /v1/completions request
OPEN_PATHS = ("/health",)  # routes the API key does not guard

_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 503, 504)
}


def error_response(exc: EngineError) -> JSONResponse:
    return JSONResponse(exc.to_body(), status_code=exc.status_code, headers=exc.headers or None)


# --------------------------------------------------------------------------- engine over a Serve handle


class ServeEngineClient:
    """The engine protocol over a ``DeploymentHandle`` to ``LLMServer`` (or a router with the same methods).

    Adapter requests are sent with ``multiplexed_model_id`` so Serve routes them to replicas that
    hold the adapter and batches them apart from the base model.
    """

    CARDS_TTL_S: float | None = None  # how long the model list is reused (None: for the replica's life)

    def __init__(self, handle: Any, *, retry_after_s: float = 1.0) -> None:
        self.handle = handle
        self.retry_after_s = retry_after_s
        self._cards: list[ModelCard] | None = None
        self._cards_at = 0.0
        self._cards_lock = asyncio.Lock()

    async def models(self) -> list[ModelCard]:
        """The served models, fetched by one request at a time (a burst on a fresh replica sends one call,
        not one per request) and with backend errors translated like generation's (503 + Retry-After)."""
        if self._cards_fresh():
            return self._cards  # type: ignore[return-value]
        async with self._cards_lock:
            if not self._cards_fresh():
                self._cards = await self._call(self.handle.models)
                self._cards_at = time.monotonic()
        return self._cards  # type: ignore[return-value]

    def _cards_fresh(self) -> bool:
        if self._cards is None:
            return False
        return self.CARDS_TTL_S is None or time.monotonic() - self._cards_at <= self.CARDS_TTL_S

    async def _call(self, method: Any, *args: Any) -> Any:
        """``await method.remote(*args)``: backend errors translated (503 + Retry-After for shedding), and
        the call cancelled downstream when the caller is (client gone or timed out)."""
        response = method.remote(*args)
        try:
            return await response
        except asyncio.CancelledError:
            response.cancel()
            raise
        except EngineError:
            raise
        except Exception as exc:
            raise self._translate(exc) from None

    async def route(self, model: str) -> str | None:
        """The multiplexed model id for ``model`` (None for the base); 404 for a model nobody serves."""
        cards = await self.models()
        for card in cards:
            if model == card.id or model == card.root or model in card.aliases:
                return card.id if card.parent else None
        raise not_found(model, [c.id for c in cards])

    async def _target(self, request: GenerationRequest, *, stream: bool = False) -> Any:
        adapter = await self.route(request.model)
        options: dict[str, Any] = {"stream": True} if stream else {}
        if adapter:
            options["multiplexed_model_id"] = adapter
        return self.handle.options(**options) if options else self.handle

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        result = await self._call((await self._target(request)).generate, request)
        if isinstance(result, ErrorInfo):
            raise result.to_error()
        return result

    async def stream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        target = await self._target(request, stream=True)
        async with contextlib.aclosing(self._relay(target.stream.remote(request))) as chunks:
            async for chunk in chunks:
                yield chunk

    async def _relay(self, responses: Any, *,
                     on_marker: Callable[[dict], None] | None = None) -> AsyncIterator[GenerationChunk]:
        """Chunks of a streaming Serve response: errors re-raised as EngineError, the call cancelled
        downstream when the consumer stops early. Dict items are markers for ``on_marker``."""
        finished = False
        try:
            async for item in responses:
                if on_marker is not None and isinstance(item, dict):
                    on_marker(item)
                    continue
                if isinstance(item, ErrorInfo):
                    raise item.to_error()
                yield item
            finished = True
        except (EngineError, GeneratorExit, asyncio.CancelledError):
            raise
        except Exception as exc:
            raise self._translate(exc) from None
        finally:
            if not finished:
                responses.cancel()

    async def abort(self, request_id: str) -> bool:
        return await self._call(self.handle.abort, request_id)

    async def check_health(self) -> None:
        await self._call(self.handle.check_health)

    def _translate(self, exc: BaseException) -> EngineError:
        from ray.serve.exceptions import BackPressureError

        cause = exc
        while cause is not None and not isinstance(cause, BackPressureError):
            cause = getattr(cause, "cause", None) or cause.__cause__
        if isinstance(cause, BackPressureError):
            retry = cause.retry_after_s if cause.retry_after_s is not None else self.retry_after_s
            return EngineError("The server is overloaded: too many requests are queued. Retry shortly.",
                               status_code=cause.status_code, type="server_overloaded", code="overloaded",
                               headers={"Retry-After": str(max(1, int(round(retry + 0.499))))})
        return EngineError(f"model backend unavailable: {type(exc).__name__}: {exc}", status_code=503,
                           type="service_unavailable", code="backend_unavailable",
                           headers={"Retry-After": str(max(1, int(self.retry_after_s)))})


# --------------------------------------------------------------------------- ASGI guards


class _Guard:
    """Pure ASGI middleware: API key (401) on every route but health, then body size (413)."""

    def __init__(self, app: Any, *, api_key: str | None, max_body_bytes: int) -> None:
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if self.api_key is not None and not path.endswith(OPEN_PATHS):
            refusal = self._check_key(scope)
            if refusal is not None:
                await error_response(refusal)(scope, receive, send)
                return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        too_big = EngineError(f"request body exceeds {self.max_body_bytes} bytes", status_code=413,
                              code="request_too_large")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            await error_response(too_big)(scope, receive, send)
            return
        if scope.get("method") in ("POST", "PUT", "PATCH"):
            # Buffer the body (bounded) so a chunked upload cannot exceed the limit either.
            body = bytearray()
            more = True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > self.max_body_bytes:
                    await error_response(too_big)(scope, receive, send)
                    return
            replayed = False

            async def replay() -> dict:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": bytes(body), "more_body": False}
                return await receive()

            await self.app(scope, replay, send)
            return
        await self.app(scope, receive, send)

    def _check_key(self, scope: dict) -> EngineError | None:
        headers = dict(scope.get("headers") or [])
        value = headers.get(b"authorization", b"").decode("latin-1").strip()
        scheme, _, token = value.partition(" ")
        if not value or scheme.lower() != "bearer" or not token.strip():
            return EngineError("Missing API key: send the header 'Authorization: Bearer <key>'.", status_code=401,
                               type="authentication_error", code="missing_api_key",
                               headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):  # type: ignore[union-attr]
            return EngineError("Incorrect API key provided.", status_code=401, type="authentication_error",
                               code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        return None


# --------------------------------------------------------------------------- the app


def make_api(engine: Any, config: ServeConfig | dict[str, Any] | None = None) -> FastAPI:
    """Build the OpenAI-compatible FastAPI app around ``engine`` (anything implementing the engine protocol).

    Example:
        >>> app = make_api(TransformersEngine.from_source("tiny-lm@production"))  # doctest: +SKIP
    """
    cfg = config if isinstance(config, ServeConfig) else load_config(ServeConfig, config or {})
    metrics = ServeMetrics()
    app = FastAPI(title="llmstack OpenAI-compatible API", version="1", docs_url="/docs", redoc_url=None)
    app.add_middleware(_Guard, api_key=cfg.api_key, max_body_bytes=cfg.max_body_bytes)
    app.state.metrics = metrics
    app.state.engine = engine

    @app.exception_handler(EngineError)
    async def _engine_error(_: Request, exc: EngineError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(EngineError(str(exc.detail), status_code=exc.status_code, type=kind))

    @app.exception_handler(Exception)
    async def _bug(_: Request, exc: Exception) -> JSONResponse:  # never a bare 500 page
        return error_response(EngineError(f"internal error: {type(exc).__name__}", status_code=500,
                                          type="server_error"))

    async def default_model() -> str:
        return (await engine.models())[0].id

    async def call(route: str, model: str, fn: Callable[[], Awaitable[Response]]) -> Response:
        """Count, time and error-map one request; enforce the request timeout."""
        start = time.perf_counter()
        gauge = metrics.in_flight.labels(model)
        gauge.inc()
        streaming = False
        try:
            try:
                response = await asyncio.wait_for(fn(), timeout=cfg.request_timeout_s)
            except asyncio.TimeoutError:
                raise EngineError(f"generation did not finish within {cfg.request_timeout_s} s and was cancelled",
                                  status_code=504, type="timeout_error", code="timeout") from None
            streaming = isinstance(response, StreamingResponse)
        except EngineError as exc:
            if exc.code == "overloaded":
                metrics.shed.labels(model).inc()
            metrics.requests.labels(route, model, str(exc.status_code)).inc()
            return error_response(exc)
        finally:
            if not streaming:
                gauge.dec()
        metrics.requests.labels(route, model, str(response.status_code)).inc()
        if streaming:  # in flight (and timed) until the last event is sent or the client leaves
            inner = response.body_iterator

            async def tracked() -> AsyncIterator[Any]:
                try:
                    async for part in inner:
                        yield part
                finally:
                    gauge.dec()
                    metrics.latency.labels(route, model).observe(time.perf_counter() - start)

            response.body_iterator = tracked()
        else:
            metrics.latency.labels(route, model).observe(time.perf_counter() - start)
        return response

    @app.get("/health", summary="Liveness of the API and its model backend")
    async def health() -> JSONResponse:
        try:
            await asyncio.wait_for(engine.check_health(), timeout=10)
        except Exception as exc:
            return error_response(EngineError(f"unhealthy: {exc}", status_code=503, type="service_unavailable"))
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models", response_model=ModelList, responses=_ERROR_RESPONSES)
    async def list_models() -> ModelList:
        return ModelList(data=await engine.models())

    @app.post("/v1/completions", response_model=CompletionResponse, responses=_ERROR_RESPONSES)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        model = body.model or await default_model()
        prompts = _prompts(body.prompt)
        requests = [GenerationRequest(model=model, prompt=p, sampling=body.sampling()) for p in prompts]
        if body.stream:
            return await call("completions", model,
                              lambda: _stream_response(engine, requests, model, _completion_chunk(body, prompts),
                                                       cfg, metrics, body.stream_options))
        return await call("completions", model, lambda: _complete(engine, requests, model, body, prompts, metrics))

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=_ERROR_RESPONSES)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        model = body.model or await default_model()
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        requests = [GenerationRequest(model=model, messages=messages, sampling=body.sampling())]
        if body.stream:
            return await call("chat", model, lambda: _stream_response(engine, requests, model, _chat_chunk(),
                                                                      cfg, metrics, body.stream_options))
        return await call("chat", model, lambda: _chat(engine, requests[0], model, metrics))

    return app


def _prompts(prompt: Any) -> list[str | list[int]]:
    if isinstance(prompt, str):
        prompts: list[Any] = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [list(prompt)]
    else:
        prompts = list(prompt)
    if not prompts:
        raise EngineError("prompt must not be empty", param="prompt")
    if len(prompts) > MAX_PROMPTS:
        raise EngineError(f"at most {MAX_PROMPTS} prompts per request, got {len(prompts)}", param="prompt")
    return prompts


def _validation_error(exc: RequestValidationError) -> EngineError:
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return EngineError(f"request body is not valid JSON: {first.get('ctx', {}).get('error', '')}".rstrip(": "),
                           code="invalid_json")
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = loc[0] if loc else None
    message = "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')} "
        f"(got {_short(e.get('input'))})" for e in errors[:5])
    return EngineError(f"invalid request: {message}", param=param, code="invalid_value")


def _short(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


async def _complete(engine: Any, requests: list[GenerationRequest], model: str, body: CompletionRequest,
                    prompts: list[Any], metrics: ServeMetrics) -> JSONResponse:
    results = await _gather([engine.generate(r) for r in requests])
    n = body.n
    choices = []
    for i, (result, prompt) in enumerate(zip(results, prompts)):
        metrics.observe_result(model, prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                               timing=result.timing, cached=result.cached)
        for choice in result.choices:
            text = (prompt + choice.text) if body.echo and isinstance(prompt, str) else choice.text
            choices.append(CompletionChoice(index=i * n + choice.index, text=text, finish_reason=choice.finish_reason))
    prompt_tokens = sum(r.prompt_tokens for r in results)
    completion_tokens = sum(r.completion_tokens for r in results)
    response = CompletionResponse(id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), model=model,
                                  choices=choices, usage=Usage(prompt_tokens=prompt_tokens,
                                                               completion_tokens=completion_tokens,
                                                               total_tokens=prompt_tokens + completion_tokens))
    return JSONResponse(response.model_dump())


async def _chat(engine: Any, request: GenerationRequest, model: str, metrics: ServeMetrics) -> JSONResponse:
    result = await engine.generate(request)
    metrics.observe_result(model, prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                           timing=result.timing, cached=result.cached)
    response = ChatCompletionResponse(
        id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=model,
        choices=[ChatChoice(index=c.index, message=ChatChoiceMessage(content=c.text), finish_reason=c.finish_reason)
                 for c in result.choices],
        usage=Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                    total_tokens=result.prompt_tokens + result.completion_tokens))
    return JSONResponse(response.model_dump())


async def _gather(coros: list[Awaitable[Any]]) -> list[Any]:
    """Like asyncio.gather, but the first error cancels the rest."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()


# --------------------------------------------------------------------------- streaming


ChunkRenderer = Callable[[str, int, GenerationChunk, int, bool], list[dict[str, Any]]]


def _completion_chunk(body: CompletionRequest, prompts: list[Any]) -> ChunkRenderer:
    def render(rid: str, created: int, chunk: GenerationChunk, offset: int, first: bool) -> list[dict[str, Any]]:
        events = []
        for delta in chunk.deltas:
            text = delta.text
            if first and body.echo and isinstance(prompts[offset // body.n], str):
                text = prompts[offset // body.n] + text
            events.append({"id": rid, "object": "text_completion", "created": created, "model": chunk.model,
                           "choices": [{"index": offset + delta.index, "text": text, "logprobs": None,
                                        "finish_reason": delta.finish_reason}]})
        return events
    return render


def _chat_chunk() -> ChunkRenderer:
    def render(rid: str, created: int, chunk: GenerationChunk, offset: int, first: bool) -> list[dict[str, Any]]:
        events = []
        for delta in chunk.deltas:
            content: dict[str, Any] = {"content": delta.text}
            if first:
                content["role"] = "assistant"
            events.append({"id": rid, "object": "chat.completion.chunk", "created": created, "model": chunk.model,
                           "choices": [{"index": offset + delta.index, "delta": content,
                                        "finish_reason": delta.finish_reason}]})
        return events
    return render


async def _stream_response(engine: Any, requests: list[GenerationRequest], model: str, render: ChunkRenderer,
                           cfg: ServeConfig, metrics: ServeMetrics,
                           stream_options: dict[str, Any] | None) -> StreamingResponse:
    """Start the streams, wait for each one's first chunk (so errors still get a status code), then SSE."""
    start = time.perf_counter()
    deadline = time.monotonic() + cfg.request_timeout_s
    streams = [engine.stream(r) for r in requests]
    firsts: list[GenerationChunk | None] = []
    try:
        for stream in streams:
            firsts.append(await _next(stream, deadline))
    except BaseException:
        for stream in streams:
            await stream.aclose()
        raise
    rid = f"{'chatcmpl' if render.__qualname__.startswith('_chat') else 'cmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())
    n = requests[0].sampling.n
    include_usage = bool((stream_options or {}).get("include_usage"))

    async def events() -> AsyncIterator[str]:
        usage = [0, 0]
        queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

        async def pump(index: int, stream: AsyncIterator[GenerationChunk], first: GenerationChunk | None) -> None:
            try:
                if first is not None:
                    await queue.put((index, first))
                    while True:
                        chunk = await _next(stream, deadline)
                        if chunk is None:
                            break
                        await queue.put((index, chunk))
            except BaseException as exc:  # noqa: BLE001 - forwarded to the SSE writer
                await queue.put((index, exc))
            finally:
                await queue.put((index, None))

        tasks = [asyncio.ensure_future(pump(i, s, f)) for i, (s, f) in enumerate(zip(streams, firsts))]
        seen_first: set[int] = set()
        open_streams = len(tasks)
        ttft_recorded = False
        try:
            while open_streams:
                index, item = await queue.get()
                if item is None:
                    open_streams -= 1
                    continue
                if isinstance(item, BaseException):
                    error = item if isinstance(item, EngineError) else EngineError(
                        f"stream failed: {type(item).__name__}", status_code=500, type="server_error")
                    if isinstance(item, asyncio.TimeoutError):
                        error = EngineError("generation timed out and was cancelled", status_code=504,
                                            type="timeout_error", code="timeout")
                    yield f"data: {json.dumps(error.to_body())}\n\n"
                    return
                if not ttft_recorded and any(d.text for d in item.deltas):
                    metrics.ttft.labels(model).observe(time.perf_counter() - start)
                    ttft_recorded = True
                first = index not in seen_first
                seen_first.add(index)
                for event in render(rid, created, item, index * n, first):
                    yield f"data: {json.dumps(event)}\n\n"
                if item.finished:
                    usage[0] += item.prompt_tokens
                    usage[1] += item.completion_tokens
                    metrics.prompt_tokens.labels(model).inc(item.prompt_tokens)
                    metrics.completion_tokens.labels(model).inc(item.completion_tokens)
                    if item.cached:
                        metrics.cache_hits.labels(model).inc()
                    if item.timing is not None and not item.cached:
                        metrics.queue_wait.labels(model).observe(item.timing.queue_s)
                        metrics.batch_size.labels(model).observe(item.timing.batch_size)
            if include_usage:
                yield "data: " + json.dumps({"id": rid, "object": "chat.completion.chunk", "created": created,
                                             "model": model, "choices": [],
                                             "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1],
                                                       "total_tokens": usage[0] + usage[1]}}) + "\n\n"
            yield "data: [DONE]\n\n"
        finally:  # client disconnected or done: stop every generation still running
            for task in tasks:
                task.cancel()
            for stream in streams:
                try:
                    await stream.aclose()
                except BaseException:  # noqa: BLE001
                    pass

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _next(stream: AsyncIterator[GenerationChunk], deadline: float) -> GenerationChunk | None:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise asyncio.TimeoutError
    try:
        return await asyncio.wait_for(stream.__anext__(), timeout=remaining)
    except StopAsyncIteration:
        return None


# --------------------------------------------------------------------------- the Serve deployment


@serve.deployment(name="OpenAIIngress")
@serve.ingress()
class OpenAIIngress:
    """HTTP ingress deployment: the OpenAI API in front of a model (or router) deployment handle."""

    def __init__(self, backend: Any, config: dict[str, Any]) -> None:
        self.config = load_config(ServeConfig, config)
        self.engine = ServeEngineClient(backend, retry_after_s=self.config.retry_after_s)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return make_api(self.engine, self.config)
