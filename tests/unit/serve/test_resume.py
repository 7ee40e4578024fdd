"""Resuming a request on another replica when its replica dies (ServeEngineClient over a real engine, no Ray
cluster): the caller sees one stream, token-identical for greedy requests, with usage of the original prompt."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from llmstack.errors import RequestError
from llmstack.serve.deployments.client import ServeEngineClient
from llmstack.serve.http import make_api
from llmstack.serve.protocol import GenerationChunk, GenerationRequest, SamplingParams


def _actor_died() -> Exception:
    from ray.exceptions import ActorDiedError

    return ActorDiedError()


class _Response:
    """What ``method.remote()`` returns: awaitable (a unary call) and async-iterable (a streaming call)."""

    def __init__(self, source: Any, *, die_after: int | None) -> None:
        self.source = source
        self.die_after = die_after  # chunks before the replica dies (None: it lives)

    def __await__(self) -> Any:
        async def unary() -> Any:
            if self.die_after is not None:
                raise _actor_died()
            return await self.source
        return unary().__await__()

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[Any]:
        sent = 0
        async for chunk in self.source:
            if self.die_after is not None and sent >= self.die_after:
                await self.source.aclose()
                raise _actor_died()
            sent += 1
            yield chunk

    def cancel(self) -> None:
        pass


class _DyingReplicas:
    """A deployment handle over one engine whose first ``deaths`` calls land on a replica that dies after
    ``die_after`` chunks; records every request it was sent."""

    def __init__(self, engine: Any, *, deaths: int, die_after: int = 3) -> None:
        self.engine, self.deaths, self.die_after = engine, deaths, die_after
        self.sent: list[GenerationRequest] = []

    def options(self, **_: Any) -> _DyingReplicas:
        return self

    def __getattr__(self, name: str) -> Any:
        handle = self

        class _Method:
            @staticmethod
            def remote(*args: Any) -> _Response:
                if name in ("generate", "stream"):
                    handle.sent.append(args[0])
                dies = name in ("generate", "stream") and handle.deaths > 0
                handle.deaths -= dies
                call = getattr(handle.engine, name)(*args)
                return _Response(call, die_after=handle.die_after if dies else None)
        return _Method()


async def _collect(stream: AsyncIterator[GenerationChunk]) -> tuple[list[int], str, GenerationChunk]:
    ids, text, last = [], "", None
    async for chunk in stream:
        for delta in chunk.deltas:
            ids += delta.token_ids
            text += delta.text
        last = chunk
    assert last is not None and last.finished
    return ids, text, last


def _request(**fields: Any) -> GenerationRequest:
    sampling = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    return GenerationRequest(model="tiny", sampling=sampling, **fields)


@pytest.mark.parametrize("prompt", [{"prompt": "The quick brown fox"},
                                    {"messages": [{"role": "user", "content": "Say something"}]}])
def test_a_greedy_stream_resumed_after_its_replica_died_equals_an_uninterrupted_one(engine: Any,
                                                                                     prompt: dict[str, Any]) -> None:
    async def main() -> None:
        whole_ids, whole_text, whole_last = await _collect(engine.stream(_request(**prompt)))
        handle = _DyingReplicas(engine, deaths=1, die_after=3)
        ids, text, last = await _collect(ServeEngineClient(handle).stream(_request(**prompt)))
        assert (ids, text) == (whole_ids, whole_text)
        assert (last.prompt_tokens, last.completion_tokens) == (whole_last.prompt_tokens, 12)
        assert last.resumed == 1
        continuation = handle.sent[1]  # the prompt (or chat) again, and the ids delivered before the death
        assert continuation.resume_token_ids == whole_ids[:len(continuation.resume_token_ids)]
        assert 0 < len(continuation.resume_token_ids) < 12
        assert continuation.sampling == handle.sent[0].sampling

    asyncio.run(main())


def test_a_resumed_request_without_max_tokens_keeps_the_default_budget(engine: Any) -> None:
    """Delivered ids count against the server's default max_tokens too (not a fresh default on resume)."""
    async def main() -> None:
        request = GenerationRequest(model="tiny", prompt="x", sampling=SamplingParams(temperature=0, ignore_eos=True))
        _, _, whole = await _collect(engine.stream(request))
        _, _, resumed = await _collect(ServeEngineClient(_DyingReplicas(engine, deaths=2, die_after=2)).stream(
            request.model_copy()))
        assert resumed.completion_tokens == whole.completion_tokens and resumed.resumed == 2

    asyncio.run(main())


def test_a_non_streamed_request_is_sent_again_when_its_replica_dies(engine: Any) -> None:
    async def main() -> None:
        whole = await engine.generate(_request(prompt="import os"))
        result = await ServeEngineClient(_DyingReplicas(engine, deaths=1)).generate(_request(prompt="import os"))
        assert result.choices[0].token_ids == whole.choices[0].token_ids and result.resumed == 1
        assert (result.prompt_tokens, result.completion_tokens) == (whole.prompt_tokens, whole.completion_tokens)

    asyncio.run(main())


def test_resumes_are_limited_then_the_client_gets_the_openai_503(engine: Any) -> None:
    """Past the attempts a stream ends with an SSE error event and [DONE], a non-streamed request with a 503."""
    async def main() -> tuple[httpx.Response, httpx.Response, str]:
        app = make_api(ServeEngineClient(_DyingReplicas(engine, deaths=100, die_after=2), resume_attempts=2), {})
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            body = {"model": "tiny", "prompt": "hi", "max_tokens": 8, "temperature": 0}
            streamed = await http.post("/v1/completions", json={**body, "stream": True})
            unary = await http.post("/v1/completions", json=body)
            return streamed, unary, (await http.get("/metrics")).text

    streamed, unary, _ = asyncio.run(main())
    lines = [line[6:] for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert streamed.status_code == 200 and lines[-1] == "[DONE]"
    assert json.loads(lines[-2])["error"]["code"] == "backend_unavailable"
    assert "".join(json.loads(p)["choices"][0]["text"] for p in lines[:-2])  # what was delivered before
    assert unary.status_code == 503 and unary.json()["error"]["code"] == "backend_unavailable"
    assert "Retry-After" in unary.headers


def test_resumed_requests_are_counted(engine: Any) -> None:
    async def main() -> str:
        handle = _DyingReplicas(engine, deaths=2, die_after=2)
        app = make_api(ServeEngineClient(handle), {})
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            body = {"model": "tiny", "prompt": "hi", "max_tokens": 8, "temperature": 0}
            assert (await http.post("/v1/completions", json={**body, "stream": True})).status_code == 200
            handle.deaths = 1  # the stream was resumed twice (one request); now one unary request is
            assert (await http.post("/v1/completions", json=body)).status_code == 200
            assert (await http.post("/v1/completions", json=body)).status_code == 200  # no death left
            return (await http.get("/metrics")).text

    assert 'llmstack_resumed_requests_total{model="tiny"} 2.0' in asyncio.run(main())


def test_resume_ids_are_checked(engine: Any) -> None:
    with pytest.raises(RequestError, match="n=1"):
        engine.prepare(_request(prompt="x", resume_token_ids=[1]).model_copy(
            update={"sampling": SamplingParams(n=2, max_tokens=4)}))
    with pytest.raises(RequestError, match="nothing is left"):
        engine.prepare(_request(prompt="x", resume_token_ids=[1] * 12))
    work = engine.prepare(_request(prompt="x", resume_token_ids=[5, 6]))
    assert work.prompt_ids[-2:] == [5, 6] and work.max_tokens == 10


def test_only_an_actor_death_inside_rays_wrappers_counts_as_a_lost_replica() -> None:
    from ray.exceptions import ActorUnavailableError, RayTaskError
    from ray.serve.exceptions import BackPressureError, RayServeException

    from llmstack.serve.deployments.client import replica_died

    wrapped = RayServeException("upstream crashed")
    wrapped.__cause__ = _actor_died()
    task_error = RayTaskError("stream", "traceback", _actor_died())
    assert replica_died(_actor_died()) and replica_died(wrapped) and replica_died(task_error)
    assert replica_died(ActorUnavailableError("unreachable", b"\x00" * 16))
    assert not replica_died(RequestError("bad prompt"))
    assert not replica_died(BackPressureError(num_queued_requests=1, max_queued_requests=1))
    assert not replica_died(RuntimeError("a bug"))
