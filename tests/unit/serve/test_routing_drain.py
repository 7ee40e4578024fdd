"""The routing ingress (canary and multi-region apps) in-process: it follows the app's drain board like the plain
ingress (new requests 503 + Retry-After, live streams finish with [DONE]) and admits by predicted time."""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmstack.config import ServeConfig, to_dict
from llmstack.errors import RequestError
from llmstack.serve.deployments.drain import DrainBoard
from llmstack.serve.http.admission import Admission
from llmstack.serve.protocol import (ChoiceDelta, ChoiceOutput, GenerationChunk, GenerationRequest, GenerationResult,
                                     ModelCard, Timing)
from llmstack.serve.routing.canary_config import CanaryConfig
from llmstack.serve.routing.ingress import RoutingEngine, routing_api
from llmstack.serve.routing.regions_config import load_regions_config, spec_of

V1, V2 = "tiny-lm@v1", "tiny-lm@v2"


class PacedVersion:
    """An engine-protocol double for one model version: one request at a time, ``step_s`` per streamed token."""

    def __init__(self, step_s: float) -> None:
        self.step_s = step_s
        self.slot = asyncio.Semaphore(1)
        self.started = 0

    async def stream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        self.started += 1
        async with self.slot:
            steps = request.sampling.max_tokens or 1
            for i in range(steps):
                await asyncio.sleep(self.step_s)
                last = i == steps - 1
                yield GenerationChunk(request_id=request.request_id, model="tiny-lm", finished=last,
                                      deltas=[ChoiceDelta(index=0, text=f"t{i}", token_ids=[7],
                                                          finish_reason="length" if last else None)])

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        self.started += 1
        async with self.slot:
            steps = request.sampling.max_tokens or 1
            await asyncio.sleep(self.step_s * steps)
            return GenerationResult(request_id=request.request_id, model="tiny-lm", prompt_tokens=1,
                                    completion_tokens=steps, timing=Timing(queue_s=0.0, total_s=self.step_s * steps,
                                                                          batch_size=1),
                                    choices=[ChoiceOutput(index=0, text="t" * steps, token_ids=[7] * steps,
                                                          finish_reason="length")])

    async def models(self) -> list[ModelCard]:
        return [ModelCard(id="tiny-lm")]

    async def check_health(self) -> None:
        return None

    async def abort(self, request_id: str) -> bool:
        return False


class LocalActor:
    """A Ray actor handle's shape over an in-process object (``await handle.method.remote(...)``)."""

    def __init__(self, target: Any) -> None:
        self.target = target

    def __getattr__(self, method: str) -> Any:
        target = self.target

        class Method:
            @staticmethod
            def remote(*args: Any, **kwargs: Any) -> Any:
                async def call() -> Any:
                    result = getattr(target, method)(*args, **kwargs)
                    return await result if inspect.isawaitable(result) else result
                return call()
        return Method


def _serve(registry_dir: Path, **http: Any) -> dict[str, Any]:
    return to_dict(ServeConfig(model=V1, registry=str(registry_dir), app_name="routing-drain",
                               http={"retry_after_s": 2, **http}))


def _canary_scope(serve: dict[str, Any], *, prefix: str = "") -> dict[str, Any]:
    versions = [{"name": n, "ref": n, "serve": serve, "deployment": f"LLMServer-{prefix}{n}",
                 "deployment_class": None, "deployment_args": {}, "app": "routing-drain"} for n in (V1, V2)]
    return {"canary": to_dict(CanaryConfig(candidate=V2)), "stable": V1, "candidate": V2,
            "weights": {V1: 50.0, V2: 50.0}, "versions": versions}


def canary_engine(registry_dir: Path, step_s: float, **http: Any) -> RoutingEngine:
    """A canary app's engine (two versions, 50/50), each version a paced fake."""
    serve = _serve(registry_dir, **http)
    engine = RoutingEngine({"canary": {V1: None, V2: None}}, {"serve": serve, "canary": _canary_scope(serve)})
    for version in engine.canaries[""].versions.values():
        version.client = PacedVersion(step_s)
    return engine


def regions_engine(registry_dir: Path, step_s: float, attempt_timeout_s: float = 30.0, **http: Any) -> RoutingEngine:
    """A two-region app's engine (one region with a canary of its own), each backend a paced fake."""
    cfg, serve_cfg = load_regions_config({**_serve(registry_dir, **http),
                                          "regions": {"a": {"price_per_replica_hour": 1.0},
                                                      "b": {"price_per_replica_hour": 2.0}},
                                          "routing": {"policy": "round_robin", "attempt_timeout_s": attempt_timeout_s}})
    spec = spec_of(cfg, serve_cfg)
    spec["regions"]["b"]["canary"] = _canary_scope(spec["serve"], prefix="b--")
    engine = RoutingEngine({"regions": {"a": None, "b": {V1: None, V2: None}}}, spec)
    engine.regions.clients["a"] = PacedVersion(step_s)  # type: ignore[union-attr]
    for version in engine.canaries["b"].versions.values():
        version.client = PacedVersion(step_s)
    return engine


ENGINES = {"canary": canary_engine, "regions": regions_engine}


def _events(response: httpx.Response) -> list[Any]:
    payloads = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    return [p if p == "[DONE]" else json.loads(p) for p in payloads]


def _client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=60)


@pytest.mark.parametrize("kind", sorted(ENGINES))
def test_the_routing_ingress_drains_when_the_board_says_so(kind: str, tmp_path: Path) -> None:
    engine = ENGINES[kind](tmp_path, step_s=0.05)
    board = DrainBoard()

    async def main() -> tuple[httpx.Response, list[httpx.Response], int]:
        app = routing_api(engine, None, LocalActor(board))  # follows the board from this (the replica's) loop
        async with _client(app) as c:
            body = {"model": "tiny-lm", "prompt": "x", "max_tokens": 8, "stream": True}
            live = asyncio.ensure_future(c.post("/v1/completions", json=body))
            while app.state.drain.live == 0:
                await asyncio.sleep(0.01)
            await board.start(30.0)  # what SIGTERM to the deploying process does
            while not app.state.drain.draining:
                await asyncio.sleep(0.01)
            refused = [await c.post("/v1/completions", json=body),
                       await c.post("/v1/chat/completions",
                                    json={"model": "tiny-lm", "messages": [{"role": "user", "content": "y"}]}),
                       await c.get("/health")]
            streamed = await live
            for _ in range(200):  # the replica reports itself idle once its last stream ended
                if await board.idle_replicas():
                    break
                await asyncio.sleep(0.01)
            return streamed, refused, await board.idle_replicas()

    streamed, refused, idle = asyncio.run(main())
    events = _events(streamed)
    assert streamed.status_code == 200 and events[-1] == "[DONE]"
    assert [e["choices"][0]["text"] for e in events[:-1]] == [f"t{i}" for i in range(8)]  # finished in full
    for response in refused:
        assert response.status_code == 503 and response.headers["Retry-After"] == "2"
        assert response.json()["error"]["code"] == "shutting_down"
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert idle == 1


@pytest.mark.parametrize("kind", sorted(ENGINES))
def test_the_routing_ingress_sheds_a_burst_by_predicted_time(kind: str, tmp_path: Path) -> None:
    # Backends serving one stream at a time, 10 ms a token: 60 streams x 10 tokens is ~3 s (two backends) of
    # work against a 1.5 s timeout. The excess is shed with 503 + Retry-After; what is admitted finishes; a
    # request shed while it waited for its first chunk is no evidence against a region or a canary version.
    engine = ENGINES[kind](tmp_path, step_s=0.01, request_timeout_s=1.5)

    async def main() -> list[httpx.Response]:
        async with _client(routing_api(engine, None)) as c:
            body = {"model": "tiny-lm", "prompt": "x", "max_tokens": 10, "stream": True}
            return list(await asyncio.gather(*[c.post("/v1/completions", json=body) for _ in range(60)]))

    responses = asyncio.run(main())
    statuses = [r.status_code for r in responses]
    assert 504 not in statuses and set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) >= 5 and statuses.count(503) >= 5, statuses
    for r in responses:
        if r.status_code == 503:
            assert int(r.headers["Retry-After"]) >= 1 and r.json()["error"]["code"] == "overloaded"
        else:
            events = _events(r)
            assert events[-1] == "[DONE]" and len(events) == 11
            assert events[-2]["choices"][0]["finish_reason"] == "length"
    if engine.regions is not None:  # before the fix: shed requests closed a running stream, "region failed"
        for name, state in engine.regions.router.regions.items():
            totals = dict(state.totals)
            assert state.healthy and totals.get("failed", 0) == 0 and totals.get("ejections", 0) == 0, (name, totals)
    if kind == "canary":  # every answer is evidence, none an error; the shed ones are none at all
        observed = engine.canaries[""].report()["obs"]
        assert len(observed) == statuses.count(200)
        assert not any(error for _, _, _, _, error, _, _ in observed), observed


def test_a_regions_app_admits_only_what_its_attempt_timeout_lets_the_regions_answer(tmp_path: Path) -> None:
    # Each region answers one request at a time in 0.2 s (10 tokens x 20 ms): 60 requests are ~6 s of work. The
    # request timeout (60 s) would admit them all, but a region attempt must answer within 3 s or it times out
    # as the region's failure and retries into a 504: admission bounds the answer by the attempt timeout too.
    engine = regions_engine(tmp_path, step_s=0.02, attempt_timeout_s=3.0, request_timeout_s=60)
    assert engine.attempt_timeout_s == 3.0 and canary_engine(tmp_path, 0.02).attempt_timeout_s is None

    async def main() -> list[httpx.Response]:
        async with _client(routing_api(engine, None)) as c:
            body = {"model": "tiny-lm", "prompt": "x", "max_tokens": 10}
            return list(await asyncio.gather(*[c.post("/v1/completions", json=body) for _ in range(60)]))

    responses = asyncio.run(main())
    statuses = [r.status_code for r in responses]
    assert 504 not in statuses and set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) >= 5 and statuses.count(503) >= 5, statuses
    for r in responses:
        if r.status_code == 503:
            assert int(r.headers["Retry-After"]) >= 1 and r.json()["error"]["code"] == "overloaded"
            assert "attempt timeout" in r.json()["error"]["message"]
    for name, state in engine.regions.router.regions.items():  # type: ignore[union-attr]
        totals = dict(state.totals)
        assert state.healthy and totals.get("failed", 0) == 0 and totals.get("ejections", 0) == 0, (name, totals)


def test_the_attempt_timeout_bounds_a_streams_start_and_a_whole_answer() -> None:
    def measured(**limits: float) -> Admission:  # 100 tokens/s measured, 5 s of work queued
        admission = Admission(request_timeout_s=100.0, **limits)
        admission._rate_busy_s, admission._rate_tokens, admission.pending_tokens = 1.0, 100.0, 500.0
        return admission

    assert measured(attempt_timeout_s=10.0).admit(400, steps=400, streamed=True)  # starts at ~5 s, ends ~9 s
    with pytest.raises(RequestError) as whole:  # its whole answer would come at ~11 s: past 0.9 x 10 s
        measured(attempt_timeout_s=10.0).admit(600, steps=600)
    assert whole.value.status_code == 503 and "10 s router's attempt timeout" in whole.value.message
    with pytest.raises(RequestError) as late:  # a stream that would start only at ~5 s: past 0.9 x 5 s
        measured(attempt_timeout_s=5.0).admit(1, steps=1, streamed=True)
    assert "start answering" in late.value.message and late.value.headers["Retry-After"] == "1"
    assert measured().admit(600, steps=600)  # no router: only the request timeout counts
