"""The HTTP layer in-process (httpx ASGI transport): it only sees the engine protocol."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from llmstack.serve.engine import EngineProtocol
from llmstack.serve.http import make_api
from llmstack.serve.protocol import (
    ChoiceDelta,
    ChoiceOutput,
    EngineError,
    GenerationChunk,
    GenerationRequest,
    GenerationResult,
    ModelCard,
)


class SlowEngine:
    """A protocol implementation that takes ``delay`` seconds and records cancellation."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.cancelled = 0
        self.requests: list[GenerationRequest] = []

    async def models(self) -> list[ModelCard]:
        return [ModelCard(id="slow")]

    async def check_health(self) -> None:
        return None

    async def abort(self, request_id: str) -> bool:
        return False

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        self.requests.append(request)
        if request.model != "slow":
            raise EngineError("no such model", status_code=404, param="model", code="model_not_found")
        try:
            await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return GenerationResult(request_id=request.request_id, model=request.model, prompt_tokens=1,
                                completion_tokens=2,
                                choices=[ChoiceOutput(index=0, text="ok", token_ids=[1, 2], finish_reason="stop")])

    async def stream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        self.requests.append(request)
        if request.model != "slow":
            raise EngineError("no such model", status_code=404, param="model", code="model_not_found")
        try:
            for i in range(3):
                await asyncio.sleep(self.delay)
                yield GenerationChunk(request_id=request.request_id, model=request.model, finished=i == 2,
                                      deltas=[ChoiceDelta(index=0, text=f"t{i}",
                                                          finish_reason="length" if i == 2 else None)])
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled += 1
            raise


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def test_fake_engine_satisfies_the_protocol() -> None:
    assert isinstance(SlowEngine(0), EngineProtocol)


def test_timeout_returns_504_and_cancels_generation() -> None:
    engine = SlowEngine(delay=5)
    app = make_api(engine, {"http": {"request_timeout_s": 0.2}})

    async def main() -> httpx.Response:
        async with client(app) as c:
            return await c.post("/v1/completions", json={"prompt": "x"})
    r = asyncio.run(main())
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
    assert engine.cancelled == 1


def test_streaming_sse_and_default_model() -> None:
    engine = SlowEngine(delay=0)
    app = make_api(engine, {})

    async def main() -> list[str]:
        async with client(app) as c:
            r = await c.post("/v1/completions", json={"prompt": "x", "stream": True})
            assert r.status_code == 200
            metrics = (await c.get("/metrics")).text
            assert 'llmstack_requests_in_flight{model="slow"} 0.0' in metrics  # released once the stream ended
            assert 'llmstack_request_latency_seconds_count{model="slow",route="completions"} 1.0' in metrics
            return [line for line in r.text.splitlines() if line]
    lines = asyncio.run(main())
    assert lines[-1] == "data: [DONE]"
    texts = [json.loads(line[6:])["choices"][0]["text"] for line in lines[:-1]]
    assert texts == ["t0", "t1", "t2"]
    assert engine.requests[0].model == "slow"  # no model given: the first served model


def test_errors_use_the_openai_shape() -> None:
    app = make_api(SlowEngine(delay=0), {"http": {"api_key": "k", "max_body_bytes": 100}})
    key = {"Authorization": "Bearer k"}

    async def main() -> list[httpx.Response]:
        async with client(app) as c:
            async def chunked() -> AsyncIterator[bytes]:
                for _ in range(10):
                    yield b'{"prompt": "' + b"x" * 20

            return [
                await c.post("/v1/completions", json={"prompt": "x"}),  # no key
                await c.post("/v1/completions", json={"prompt": "x"}, headers={"Authorization": "Bearer bad"}),
                await c.get("/health"),  # open
                await c.post("/v1/completions", content=chunked(), headers=key),  # chunked, too big
                await c.post("/v1/completions", json={"prompt": "x", "model": "other"}, headers=key),
                await c.post("/v1/completions", json={"prompt": "x", "n": 0}, headers=key),
                await c.put("/v1/completions", json={}, headers=key),
            ]
    responses = asyncio.run(main())
    assert [r.status_code for r in responses] == [401, 401, 200, 413, 404, 400, 405]
    for r in responses:
        if r.status_code != 200:
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("prompt", ["hello", [1, 2, 3], ["a", "b"], [[1, 2], [3]]])
def test_prompt_forms_fan_out(prompt: Any) -> None:
    engine = SlowEngine(delay=0)
    app = make_api(engine, {})

    async def main() -> httpx.Response:
        async with client(app) as c:
            return await c.post("/v1/completions", json={"prompt": prompt, "model": "slow"})
    r = asyncio.run(main())
    assert r.status_code == 200
    expected = len(prompt) if isinstance(prompt, list) and not isinstance(prompt[0], int) else 1
    assert len(r.json()["choices"]) == expected == len(engine.requests)


class _SheddingHandle:
    """A stand-in DeploymentHandle whose model deployment sheds every call but the first ``admit``."""

    def __init__(self, admit: int) -> None:
        self.admit = admit
        self.calls = 0
        handle = self

        class _Method:
            def __init__(self, result: Any) -> None:
                self.result = result

            def remote(self, *args: Any) -> Any:
                async def answer() -> Any:
                    from ray.serve.exceptions import BackPressureError

                    handle.calls += 1
                    await asyncio.sleep(0.05)  # every burst request arrives while the first is in flight
                    if handle.calls > handle.admit:
                        raise BackPressureError(num_queued_requests=1, max_queued_requests=1)
                    return self.result

                return answer()

        self.models = _Method([ModelCard(id="tiny")])
        self.check_health = _Method(None)


def test_a_burst_on_a_fresh_ingress_fetches_the_model_list_once() -> None:
    from llmstack.serve.deployments.client import ServeEngineClient

    async def run() -> None:
        handle = _SheddingHandle(admit=1)
        engine = ServeEngineClient(handle, retry_after_s=2)
        cards = await asyncio.gather(*(engine.models() for _ in range(16)))
        assert handle.calls == 1 and all(c[0].id == "tiny" for c in cards)

    asyncio.run(run())


def test_backend_shedding_outside_generation_keeps_the_openai_shape() -> None:
    """The model list (fetched on a replica's first request) and health go through the same error mapping."""
    from llmstack.serve.deployments.client import ServeEngineClient

    async def run() -> None:
        engine = ServeEngineClient(_SheddingHandle(admit=0), retry_after_s=2)
        async with client(make_api(engine, {"model": "tiny", "registry": "memory://x"})) as http:
            response = await http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
            assert response.status_code == 503 and response.headers["Retry-After"] == "2"
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["code"] == "overloaded"
            assert (await http.get("/health")).status_code == 503

    asyncio.run(run())


def test_only_the_exact_health_path_skips_the_api_key() -> None:
    """/v1/models/health once answered without a key (any path ending in /health was exempt)."""
    app = make_api(SlowEngine(delay=0), {"http": {"api_key": "k"}})

    async def main() -> list[httpx.Response]:
        async with client(app) as c:
            return [await c.get("/health"), await c.get("/v1/models/health"), await c.get("/x/health"),
                    await c.get("/v1/models/health", headers={"Authorization": "Bearer k"})]
    assert [r.status_code for r in asyncio.run(main())] == [200, 401, 401, 404]


def test_metric_labels_take_only_served_model_names() -> None:
    """Made-up model names once became labels: 1,000 of them grew /metrics from 10 KB to 833 KB."""
    app = make_api(SlowEngine(delay=0), {})

    async def main() -> tuple[str, str]:
        async with client(app) as c:
            before = (await c.get("/metrics")).text
            for i in range(40):
                stream = i % 2 == 1
                path = "/v1/chat/completions" if i % 4 >= 2 else "/v1/completions"
                body: dict[str, Any] = {"model": f"made-up-{i}", "stream": stream}
                body.update({"messages": [{"role": "user", "content": "x"}]} if "chat" in path else {"prompt": "x"})
                assert (await c.post(path, json=body)).status_code == 404
            assert (await c.post("/v1/completions", json={"model": "slow", "prompt": "x"})).status_code == 200
            assert (await c.post("/v1/completions", json={"model": "slow", "prompt": "x",
                                                          "stream": True})).status_code == 200
            return before, (await c.get("/metrics")).text

    before, after = asyncio.run(main())
    assert "made-up" not in after
    assert 'llmstack_requests_total{model="unknown",route="completions",status="404"} 20.0' in after
    assert 'llmstack_requests_total{model="unknown",route="chat",status="404"} 20.0' in after
    assert 'llmstack_requests_total{model="slow",route="completions",status="200"} 2.0' in after
    assert 'llmstack_completion_tokens_total{model="slow"} 2.0' in after
    assert len(after) < len(before) + 8_000  # a fixed set of series, not one per asked name


class _ShedStreamHandle:
    """A stand-in DeploymentHandle whose streaming calls are shed the way Ray sheds them: the response raises
    BackPressureError, and so does its ``cancel()`` (Ray's router loop re-raises the failed assignment)."""

    def __init__(self) -> None:
        class _Shed:
            def __aiter__(self) -> _Shed:
                return self

            async def __anext__(self) -> Any:
                from ray.serve.exceptions import BackPressureError

                raise BackPressureError(num_queued_requests=1, max_queued_requests=1, retry_after_s=2.5)

            def cancel(self) -> None:
                from ray.serve.exceptions import BackPressureError

                raise BackPressureError(num_queued_requests=1, max_queued_requests=1, retry_after_s=2.5)

        class _Method:
            def __init__(self, answer: Any) -> None:
                self.answer = answer

            def remote(self, *args: Any) -> Any:
                return self.answer()

        async def cards() -> list[ModelCard]:
            return [ModelCard(id="tiny")]

        self.models = _Method(cards)
        self.stream = _Method(_Shed)

    def options(self, **_: Any) -> _ShedStreamHandle:
        return self


def test_a_shed_stream_answers_the_openai_503_and_is_counted() -> None:
    """Streamed requests shed by Ray once reached the client as Ray's plain text "Request dropped due to
    backpressure" (no content type, in no counter): the handler Ray adds to the app for its BackPressureError."""
    from ray.serve.exceptions import BackPressureError
    from starlette.responses import PlainTextResponse

    from llmstack.serve.deployments.client import ServeEngineClient

    app = make_api(ServeEngineClient(_ShedStreamHandle(), retry_after_s=1), {})
    # What Ray Serve's replica does to every FastAPI ingress it runs (replica.py): Serve's own plain-text answer.
    app.add_exception_handler(BackPressureError, lambda _, exc: PlainTextResponse(exc.message, status_code=503))

    async def main() -> tuple[list[httpx.Response], str]:
        async with client(app) as c:
            responses = [await c.post("/v1/completions", json={"prompt": "x", "stream": True}),
                         await c.post("/v1/chat/completions",
                                      json={"messages": [{"role": "user", "content": "x"}], "stream": True})]
            return responses, (await c.get("/metrics")).text

    responses, metrics = asyncio.run(main())
    for r in responses:
        assert r.status_code == 503 and r.headers["content-type"] == "application/json", r.text
        assert r.headers["Retry-After"] == "3"  # the deployment's 2.5 s, rounded up
        assert r.json()["error"]["code"] == "overloaded"
    assert 'llmstack_requests_shed_total{model="tiny"} 2.0' in metrics
    assert 'llmstack_requests_total{model="tiny",route="chat",status="503"} 1.0' in metrics


def test_ray_shedding_mid_stream_is_an_sse_error_event() -> None:
    """Once a stream has begun, a failure (here Ray's BackPressureError, not an llmstack error) is one SSE
    ``error`` event in the OpenAI shape with the status code, not a cut stream."""
    from ray.serve.exceptions import BackPressureError

    class _ShedAfterOne(SlowEngine):
        async def stream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
            yield GenerationChunk(request_id=request.request_id, model=request.model,
                                  deltas=[ChoiceDelta(index=0, text="t0")])
            raise BackPressureError(num_queued_requests=1, max_queued_requests=1)

    async def main() -> httpx.Response:
        async with client(make_api(_ShedAfterOne(delay=0), {})) as c:
            return await c.post("/v1/completions", json={"prompt": "x", "stream": True})

    r = asyncio.run(main())
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert r.status_code == 200 and events[0]["choices"][0]["text"] == "t0"
    assert events[-1]["error"]["code"] == "overloaded" and events[-1]["error"]["type"] == "server_overloaded"
