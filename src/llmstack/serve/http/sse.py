"""Streaming responses: server-sent events of OpenAI chunks, started only once each stream's first chunk exists."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi.responses import StreamingResponse

from llmstack.config import ServeConfig
from llmstack.errors import RequestError
from llmstack.serve.http.admission import Admission
from llmstack.serve.http.drain import DEADLINE, Drain
from llmstack.serve.http.errors import as_request_error
from llmstack.serve.http.logprobs import chat_logprobs, completion_logprobs
from llmstack.serve.http.metrics import ServeMetrics
from llmstack.serve.protocol import CompletionRequest, GenerationChunk, GenerationRequest, Usage

ChunkRenderer = Callable[[str, int, GenerationChunk, int, bool], list[dict[str, Any]]]
CHAT_OBJECT, COMPLETION_OBJECT = "chat.completion.chunk", "text_completion"


def _renderer(obj: str, choice: Callable[[Any, int, bool], dict[str, Any]]) -> ChunkRenderer:
    """A chunk renderer: one SSE event per delta, ``choice(delta, offset, first)`` giving its choice fields."""
    def render(rid: str, created: int, chunk: GenerationChunk, offset: int, first: bool) -> list[dict[str, Any]]:
        return [{"id": rid, "object": obj, "created": created, "model": chunk.model,
                 "choices": [{"index": offset + delta.index, **choice(delta, offset, first),
                              "finish_reason": delta.finish_reason}]} for delta in chunk.deltas]
    render.object = obj  # type: ignore[attr-defined]  # which stream this is (ids and the usage chunk)
    return render


def completion_chunk(body: CompletionRequest, prompts: list[Any]) -> ChunkRenderer:
    def choice(delta: Any, offset: int, first: bool) -> dict[str, Any]:
        prompt = prompts[offset // body.n]
        echoed = prompt if first and body.echo and isinstance(prompt, str) else ""
        return {"text": echoed + delta.text, "logprobs": completion_logprobs(delta.logprobs)}
    return _renderer(COMPLETION_OBJECT, choice)


def chat_chunk() -> ChunkRenderer:
    def choice(delta: Any, offset: int, first: bool) -> dict[str, Any]:
        content: dict[str, Any] = {"content": delta.text, **({"role": "assistant"} if first else {})}
        return {"delta": content, "logprobs": chat_logprobs(delta.logprobs)}
    return _renderer(CHAT_OBJECT, choice)


async def stream_response(engine: Any, requests: list[GenerationRequest], model: str, render: ChunkRenderer,
                          cfg: ServeConfig, metrics: ServeMetrics,
                          stream_options: dict[str, Any] | None, *, label: str | None = None,
                          drain: Drain | None = None, admission: Admission | None = None) -> StreamingResponse:
    """Start the streams, wait for each one's first chunk (so errors still get a status code), then SSE.

    ``label`` is the metrics' model label (default ``model``; the app passes it bounded to served names).
    ``drain``: a stream still running when its grace period ends gets an SSE error event and ``[DONE]``.
    ``admission`` is told of every token received (its throughput estimate)."""
    label = model if label is None else label
    start = time.perf_counter()
    deadline = time.monotonic() + cfg.http.request_timeout_s
    streams = [engine.stream(r) for r in requests]
    firsts: list[GenerationChunk | None] = []
    try:
        for stream in streams:
            firsts.append(await _next(stream, deadline))
    except BaseException:
        for stream in streams:
            await stream.aclose()
        raise
    chat = getattr(render, "object", None) == CHAT_OBJECT
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())
    n = requests[0].sampling.n
    include_usage = bool((stream_options or {}).get("include_usage"))

    async def events() -> AsyncIterator[str]:
        finals: list[GenerationChunk] = []  # each stream's last chunk: the usage chunk sums them
        queue: asyncio.Queue[Any] = asyncio.Queue()  # (stream index, chunk | error | None) or DEADLINE

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
        if drain is not None:
            drain.watch(queue)
        seen_first: set[int] = set()
        open_streams = len(tasks)
        ttft_recorded = False
        first_at, steps = time.monotonic(), 0  # decode steps seen (admission's time per step)
        unfinished_tokens: dict[int, int] = {}  # per stream not finished yet: tokens sent (aborted, if it is left)
        ended = False  # the server ended the response (done, error or shutdown): the client did not leave
        try:
            while open_streams:
                entry = await queue.get()
                if entry is DEADLINE and drain is not None:  # the server shuts down: end this stream cleanly
                    ended = True
                    yield f"data: {json.dumps(drain.deadline_error().to_openai())}\n\n"
                    yield "data: [DONE]\n\n"
                    return
                index, item = entry
                if item is None:
                    open_streams -= 1
                    continue
                if isinstance(item, BaseException):
                    error = as_request_error(item)
                    if isinstance(item, asyncio.TimeoutError):
                        error = RequestError("generation timed out and was cancelled", status_code=504,
                                             type="timeout_error", code="timeout")
                    ended = True
                    yield f"data: {json.dumps(error.to_openai())}\n\n"
                    yield "data: [DONE]\n\n"  # the stream ends cleanly: clients stop reading here
                    return
                steps += index == 0
                unfinished_tokens[index] = unfinished_tokens.get(index, 0) + sum(len(d.token_ids)
                                                                                 for d in item.deltas)
                if admission is not None:
                    admission.received(sum(len(d.token_ids) or 1 for d in item.deltas))
                if not ttft_recorded and any(d.text for d in item.deltas):
                    metrics.ttft.labels(label).observe(time.perf_counter() - start)
                    ttft_recorded = True
                first = index not in seen_first
                seen_first.add(index)
                for event in render(rid, created, item, index * n, first):
                    yield f"data: {json.dumps(event)}\n\n"
                if item.finished:
                    unfinished_tokens.pop(index, None)
                    finals.append(item)
                    metrics.prompt_tokens.labels(label).inc(item.prompt_tokens)
                    metrics.completion_tokens.labels(label).inc(item.completion_tokens)
                    if item.cached:
                        metrics.cache_hits.labels(label).inc()
                    metrics.observe_prefix(label, item.prefix_cached_tokens, prompt_tokens=item.prompt_tokens)
                    if item.resumed:
                        metrics.resumed.labels(label).inc()
                    if item.timing is not None and not item.cached:
                        metrics.queue_wait.labels(label).observe(item.timing.queue_s)
                        metrics.batch_size.labels(label).observe(item.timing.batch_size)
            ended = True
            if steps >= 2:
                metrics.time_per_token.labels(label).observe((time.monotonic() - first_at) / (steps - 1))
            if admission is not None:
                admission.observed_steps(time.monotonic() - first_at, steps)
            if include_usage:
                yield "data: " + json.dumps({"id": rid, "object": CHAT_OBJECT if chat else COMPLETION_OBJECT,
                                             "created": created,
                                             "model": model, "choices": [],
                                             "usage": Usage.of(finals).model_dump()}) + "\n\n"
            yield "data: [DONE]\n\n"
        finally:  # client disconnected or done: stop every generation still running
            if not ended:
                metrics.observe_aborted(label, sum(unfinished_tokens.values()))
            if drain is not None:
                drain.unwatch(queue)
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

