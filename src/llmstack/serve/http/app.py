"""The OpenAI-compatible HTTP app. It knows only the engine protocol, never the model.

:func:`make_api` builds the FastAPI app around any :class:`~llmstack.serve.engine.EngineProtocol`:
a local :class:`~llmstack.serve.engine.TransformersEngine` (tests, notebooks) or the
:class:`~llmstack.serve.deployments.client.ServeEngineClient` of a Serve deployment handle.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both stream with server-sent
events), ``GET /v1/models``, ``GET /v1/models/{id}``, ``GET /health`` and ``GET /metrics``. Every
error has the OpenAI shape ``{"error": {"message", "type", "param", "code"}}``; bad input is a 4xx,
never a 5xx.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmstack.config import ServeConfig, load_config
from llmstack.errors import LLMStackError, RequestError, model_not_found
from llmstack.serve.http.admission import Admission, Ticket
from llmstack.serve.http.cluster_metrics import in_ray_worker
from llmstack.serve.http.drain import Drain
from llmstack.serve.http.errors import as_request_error, error_response, validation_error
from llmstack.serve.http.guard import RequestGuard
from llmstack.serve.http.logprobs import chat_logprobs, completion_logprobs
from llmstack.serve.http.metrics import UNKNOWN_MODEL, ServeMetrics, model_label
from llmstack.serve.http.sse import chat_chunk, completion_chunk, stream_response
from llmstack.serve.protocol import (
    ChatChoice,
    ChatChoiceMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    GenerationRequest,
    ModelCard,
    ModelList,
    Usage,
)

MAX_PROMPTS = 32  # prompts in one /v1/completions request
ADMISSION_CHECK_S = 0.25  # how often a request waiting for its answer is re-checked against the timeout

_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 503, 504)
}


def make_api(engine: Any, config: ServeConfig | dict[str, Any] | None = None) -> FastAPI:
    """Build the OpenAI-compatible FastAPI app around ``engine`` (anything implementing the engine protocol).

    Example:
        >>> app = make_api(TransformersEngine.from_source("tiny-lm@production"))  # doctest: +SKIP
    """
    cfg = config if isinstance(config, ServeConfig) else load_config(ServeConfig, config or {})
    metrics = ServeMetrics(cluster_app=cfg.app_name if in_ray_worker() else None)
    app = FastAPI(title="llmstack OpenAI-compatible API", version="1", docs_url="/docs", redoc_url=None)
    app.add_middleware(RequestGuard, api_key=cfg.http.api_key, max_body_bytes=cfg.http.max_body_bytes)
    app.state.metrics = metrics
    app.state.engine = engine
    drain = Drain(retry_after_s=cfg.http.retry_after_s)
    app.state.drain = drain
    admission = Admission(request_timeout_s=cfg.http.request_timeout_s, retry_after_s=cfg.http.retry_after_s,
                          attempt_timeout_s=getattr(engine, "attempt_timeout_s", None))  # a router's, if any
    app.state.admission = admission

    @app.exception_handler(LLMStackError)
    async def _llmstack_error(_: Request, exc: LLMStackError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(RequestError(str(exc.detail), status_code=exc.status_code, type=kind))

    @app.exception_handler(Exception)
    async def _bug(_: Request, exc: Exception) -> JSONResponse:  # never a bare 500 page
        return error_response(exc)

    async def default_model() -> str:
        return (await engine.models())[0].id

    async def label_of(model: str) -> str:
        """The metric label of ``model``: bounded to the served names (the model list is cached by clients)."""
        try:
            return model_label(model, await engine.models())
        except Exception:  # the backend cannot list its models: the request fails anyway
            return UNKNOWN_MODEL

    async def call(route: str, model: str, fn: Callable[[], Awaitable[Response]], requests: list[GenerationRequest],
                   *, streamed: bool = False) -> Response:
        """Count, time and error-map one request; admit it by time; enforce the request timeout and the drain.
        ``model`` is the metric label."""
        try:
            if drain.draining:
                raise drain.refusal()
            ticket = admission.admit(_token_budget(requests, cfg),
                                     steps=max(_steps(r, cfg) for r in requests), streamed=streamed)
        except RequestError as refused:
            if refused.code == "overloaded":
                metrics.shed.labels(model).inc()
            metrics.requests.labels(route, model, str(refused.status_code)).inc()
            return error_response(refused)
        start = time.perf_counter()
        gauge = metrics.in_flight.labels(model)
        gauge.inc()
        drain.admit()
        streaming = False
        try:
            response = await _answer(fn, ticket)
            streaming = isinstance(response, StreamingResponse)
        except Exception as exc:  # noqa: BLE001 - llmstack's errors and anything else (Ray's load shedding: 503)
            error = as_request_error(exc)
            if error.code == "overloaded":
                metrics.shed.labels(model).inc()
            metrics.requests.labels(route, model, str(error.status_code)).inc()
            return error_response(error)
        finally:
            if not streaming:
                gauge.dec()
                drain.release()
                admission.finish(ticket)
        metrics.requests.labels(route, model, str(response.status_code)).inc()
        if streaming:  # in flight (and timed) until the last event is sent or the client leaves
            inner = response.body_iterator

            async def tracked() -> AsyncIterator[Any]:
                try:
                    async for part in inner:
                        yield part
                finally:
                    gauge.dec()
                    drain.release()
                    admission.finish(ticket)
                    metrics.latency.labels(route, model).observe(time.perf_counter() - start)

            response.body_iterator = tracked()
        else:
            metrics.latency.labels(route, model).observe(time.perf_counter() - start)
        return response

    async def _answer(fn: Callable[[], Awaitable[Response]], ticket: Ticket) -> Response:
        """``await fn()`` within the request timeout (504) and the drain deadline (503), cancelling it past them.
        While it has not answered (a stream: not started) it is shed with 503 + Retry-After as soon as
        admission predicts it cannot finish within the timeout."""
        task = asyncio.ensure_future(fn())
        give_up_at = time.monotonic() + cfg.http.request_timeout_s
        refusal: RequestError | None = None
        try:
            while refusal is None:
                remaining = give_up_at - time.monotonic()
                if remaining <= 0:
                    break
                done, _ = await asyncio.wait([task], timeout=min(ADMISSION_CHECK_S, remaining))
                if done:
                    return task.result()
                refusal = drain.refusal() if drain.grace_over else admission.refusal(ticket)
        finally:
            if not task.done():
                task.cancel()
                await asyncio.wait([task])
        if refusal is not None:
            raise refusal
        raise RequestError(f"generation did not finish within {cfg.http.request_timeout_s} s and was cancelled",
                           status_code=504, type="timeout_error", code="timeout")

    @app.get("/health", summary="Liveness of the API and its model backend")
    async def health() -> JSONResponse:
        if drain.draining:  # a load balancer stops routing here
            return error_response(drain.refusal())
        try:
            await asyncio.wait_for(engine.check_health(), timeout=10)
        except Exception as exc:
            return error_response(RequestError(f"unhealthy: {exc}", status_code=503, type="service_unavailable"))
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def prometheus() -> Response:
        body, content_type = await metrics.render_served()
        return Response(body, media_type=content_type)

    @app.get("/v1/models", response_model=ModelList, responses=_ERROR_RESPONSES)
    async def list_models() -> ModelList:
        return ModelList(data=await engine.models())

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=_ERROR_RESPONSES)
    async def retrieve_model(model_id: str) -> ModelCard:
        cards = await engine.models()
        for card in cards:
            if model_id in (card.id, card.root, *card.aliases):
                return card
        raise model_not_found(model_id, [c.id for c in cards])

    @app.post("/v1/completions", response_model=CompletionResponse, responses=_ERROR_RESPONSES)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        body.refuse_unsupported()
        model = body.model or await default_model()
        prompts = _prompts(body.prompt)
        sampling = body.sampling(logprobs=body.logprobs)
        requests = [GenerationRequest(model=model, prompt=p, sampling=sampling) for p in prompts]
        label = await label_of(model)
        if body.stream:
            return await call("completions", label,
                              lambda: stream_response(engine, requests, model, completion_chunk(body, prompts),
                                                       cfg, metrics, body.stream_options, label=label,
                                                       drain=drain, admission=admission), requests, streamed=True)
        return await call("completions", label,
                          lambda: _complete(engine, requests, model, body, prompts, metrics, label, admission),
                          requests)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=_ERROR_RESPONSES)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        body.refuse_unsupported()
        model = body.model or await default_model()
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        sampling = body.sampling(max_tokens=body.token_limit(),
                                 logprobs=(body.top_logprobs or 0) if body.logprobs else None)
        requests = [GenerationRequest(model=model, messages=messages, sampling=sampling)]
        label = await label_of(model)
        if body.stream:
            return await call("chat", label, lambda: stream_response(engine, requests, model, chat_chunk(),
                                                                      cfg, metrics, body.stream_options,
                                                                      label=label, drain=drain,
                                                                      admission=admission), requests,
                              streamed=True)
        return await call("chat", label, lambda: _chat(engine, requests[0], model, metrics, label, admission),
                          requests)

    return app


def _prompts(prompt: Any) -> list[str | list[int]]:
    if isinstance(prompt, str):
        prompts: list[Any] = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [list(prompt)]
    else:
        prompts = list(prompt)
    if not prompts:
        raise RequestError("prompt must not be empty", param="prompt")
    if len(prompts) > MAX_PROMPTS:
        raise RequestError(f"at most {MAX_PROMPTS} prompts per request, got {len(prompts)}", param="prompt")
    return prompts



def _token_budget(requests: list[GenerationRequest], cfg: ServeConfig) -> int:
    """The most tokens ``requests`` may generate: what admission queues them by (within the server's limits:
    a request over them is the engine's 400, not an overload)."""
    return sum(min(r.sampling.n, cfg.engine.max_n) * _steps(r, cfg) for r in requests)


def _steps(request: GenerationRequest, cfg: ServeConfig) -> int:
    return min(request.sampling.max_tokens or cfg.engine.default_max_tokens, cfg.engine.max_tokens_limit)


async def _complete(engine: Any, requests: list[GenerationRequest], model: str, body: CompletionRequest,
                    prompts: list[Any], metrics: ServeMetrics, label: str, admission: Admission) -> JSONResponse:
    results = await _gather([engine.generate(r) for r in requests])
    admission.received(sum(result.completion_tokens for result in results))
    n = body.n
    choices = []
    for i, (result, prompt) in enumerate(zip(results, prompts)):
        metrics.observe_result(label, prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                               timing=result.timing, cached=result.cached,
                               prefix_cached_tokens=result.prefix_cached_tokens, resumed=result.resumed)
        for choice in result.choices:
            echoed = prompt if body.echo and isinstance(prompt, str) else ""
            choices.append(CompletionChoice(index=i * n + choice.index, text=echoed + choice.text,
                                            finish_reason=choice.finish_reason,
                                            logprobs=completion_logprobs(choice.logprobs, text_offset=len(echoed))))
    response = CompletionResponse(id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), model=model,
                                  choices=choices, usage=Usage.of(results))
    return JSONResponse(response.model_dump())


async def _chat(engine: Any, request: GenerationRequest, model: str, metrics: ServeMetrics,
                label: str, admission: Admission) -> JSONResponse:
    result = await engine.generate(request)
    admission.received(result.completion_tokens)
    metrics.observe_result(label, prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                           timing=result.timing, cached=result.cached,
                           prefix_cached_tokens=result.prefix_cached_tokens, resumed=result.resumed)
    response = ChatCompletionResponse(
        id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=model,
        choices=[ChatChoice(index=c.index, message=ChatChoiceMessage(content=c.text), finish_reason=c.finish_reason,
                            logprobs=chat_logprobs(c.logprobs)) for c in result.choices],
        usage=Usage.of([result]))
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

