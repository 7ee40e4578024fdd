"""The ingress's drain (serve/http/drain.py) in-process: refuse new work, finish live streams, end the rest."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import httpx

from llmstack.serve.http import make_api

sys.path.insert(0, str(Path(__file__).parent))
from test_ingress import SlowEngine, client  # noqa: E402


def _events(response: httpx.Response) -> list[Any]:
    payloads = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    return [p if p == "[DONE]" else json.loads(p) for p in payloads]


async def _until(condition: Any) -> None:
    while not condition():
        await asyncio.sleep(0.01)


def test_draining_refuses_new_requests_and_lets_live_streams_finish() -> None:
    engine = SlowEngine(delay=0.2)  # a stream of 3 chunks: ~0.6 s, well inside the grace period
    app = make_api(engine, {"http": {"retry_after_s": 2}})

    async def main() -> tuple[httpx.Response, list[httpx.Response], bool]:
        async with client(app) as c:
            live = asyncio.ensure_future(c.post("/v1/completions", json={"prompt": "x", "stream": True}))
            await _until(lambda: engine.requests)
            app.state.drain.start(grace_s=30)
            refused = [await c.post("/v1/completions", json={"prompt": "y", "stream": True}),
                       await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "y"}]}),
                       await c.get("/health")]
            streamed = await live
            return streamed, refused, await app.state.drain.wait_idle(5)

    streamed, refused, idle = asyncio.run(main())
    events = _events(streamed)
    assert events[-1] == "[DONE]"
    assert [e["choices"][0]["text"] for e in events[:-1]] == ["t0", "t1", "t2"]  # finished in full
    for response in refused:
        assert response.status_code == 503 and response.headers["Retry-After"] == "2"
        assert response.json()["error"]["code"] == "shutting_down"
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert len(engine.requests) == 1  # the refused requests never reached the engine
    assert idle


def test_the_deadline_ends_running_streams_with_an_error_event_and_done() -> None:
    engine = SlowEngine(delay=0.3)
    app = make_api(engine, {})

    async def main() -> tuple[httpx.Response, httpx.Response]:
        async with client(app) as c:
            stream = asyncio.ensure_future(c.post("/v1/completions", json={"prompt": "x", "stream": True}))
            await _until(lambda: engine.requests)
            engine.delay = 60  # the rest of the stream cannot fit in the grace period
            unary = asyncio.ensure_future(c.post("/v1/completions", json={"prompt": "y"}))
            await _until(lambda: len(engine.requests) == 2)
            app.state.drain.start(grace_s=0.5)
            return await stream, await unary

    streamed, unary = asyncio.run(main())
    events = _events(streamed)
    assert streamed.status_code == 200
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "shutting_down"
    assert events[0]["choices"][0]["text"] == "t0"  # what was sent before the deadline stays
    assert unary.status_code == 503 and unary.json()["error"]["code"] == "shutting_down"
    assert "Retry-After" in unary.headers
    assert engine.cancelled == 2  # both generations were stopped, not left running
