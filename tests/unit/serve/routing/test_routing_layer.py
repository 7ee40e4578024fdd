"""The routing layer without Ray: ingress replicas sharing one canary through the board, decisions and registry
writes off the request path, and a canary composed inside one region of a multi-region app."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from llmstack.config import ServeConfig, to_dict
from llmstack.errors import RequestError
from llmstack.registry import Registry
from llmstack.serve.routing.canary_config import CanaryConfig
from llmstack.serve.protocol import (ChoiceDelta, ChoiceOutput, GenerationChunk, GenerationRequest,
                                     GenerationResult, SamplingParams, Timing)
from llmstack.serve.routing.regions_config import load_regions_config, spec_of
from llmstack.serve.routing.board import RoutingBoard
from llmstack.serve.routing.headers import _SLOT, routing_headers
from llmstack.serve.routing.ingress import RoutingEngine

from .conftest import two_versions

V1, V2 = "tiny-lm@v1", "tiny-lm@v2"


class FakeVersion:
    """An engine-protocol double for one model version: answers its name, or fails with ``fail``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.fail: BaseException | None = None
        self.calls = 0

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        self.calls += 1
        if self.fail is not None:
            raise self.fail
        return GenerationResult(request_id=request.request_id, model="tiny-lm", prompt_tokens=2, completion_tokens=3,
                                choices=[ChoiceOutput(index=0, text=f"answer from {self.name}", token_ids=[1, 2, 3],
                                                      finish_reason="length")],
                                timing=Timing(queue_s=0.0, total_s=0.01, batch_size=1))

    async def stream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        yield GenerationChunk(request_id=request.request_id, model="tiny-lm",
                              deltas=[ChoiceDelta(index=0, text=self.name)], finished=True)

    async def models(self) -> list[Any]:
        return []

    async def check_health(self) -> None:
        if self.fail is not None:
            raise self.fail

    async def abort(self, request_id: str) -> bool:
        return False


class Handle:
    """A Serve handle's shape over an in-process board (``await handle.method.remote(...)``)."""

    def __init__(self, board: RoutingBoard) -> None:
        self.board = board

    def __getattr__(self, method: str) -> Any:
        board = self.board

        class Method:
            @staticmethod
            def remote(*args: Any, **kwargs: Any) -> Any:
                async def call() -> Any:
                    result = getattr(board, method)(*args, **kwargs)
                    return await result if inspect.isawaitable(result) else result
                return call()
        return Method


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    """tiny-lm@v1 (production) and tiny-lm@v2, whose validation against v1 passed."""
    return two_versions(tmp_path, v2_passed=True)


def canary_scope(serve: dict[str, Any], *, prefix: str = "", **canary: Any) -> dict[str, Any]:
    versions = [{"name": n, "ref": n, "serve": serve, "deployment": f"LLMServer-{prefix}{n}",
                 "deployment_class": None, "deployment_args": {}, "app": "routing-unit"} for n in (V1, V2)]
    return {"canary": to_dict(CanaryConfig(candidate=V2, **canary)), "stable": V1, "candidate": V2,
            "weights": {V1: 100.0}, "versions": versions}


def request(user: str | None = None) -> GenerationRequest:
    return GenerationRequest(model="tiny-lm", prompt="x", sampling=SamplingParams(max_tokens=4))


def canary_replicas(board: RoutingBoard, spec: dict[str, Any], n: int = 2) -> list[tuple[RoutingEngine, dict]]:
    """``n`` ingress replicas' engines of a canary app on one board, each version a fake."""
    out = []
    for _ in range(n):
        engine = RoutingEngine({"canary": {V1: None, V2: None}}, spec, Handle(board))
        fakes = {name: FakeVersion(name) for name in (V1, V2)}
        for name, fake in fakes.items():
            engine.canaries[""].versions[name].client = fake
        out.append((engine, fakes))
    return out


async def served(engine: RoutingEngine, n: int, *, key: str | None = None) -> list[str]:
    """``n`` requests through the replica's chain; the version header of each."""
    versions = []
    for _ in range(n):
        slot: dict[str, Any] = {"key": key}
        token = _SLOT.set(slot)
        try:
            await engine.generate(request())
        except RequestError:
            pass
        finally:
            _SLOT.reset(token)
        versions.append(dict(routing_headers(slot))[b"x-llmstack-version"].decode())
    return versions


def test_a_breach_seen_by_one_replica_rolls_back_on_every_replica(registry: Registry) -> None:
    serve = to_dict(ServeConfig(model=V1, registry=registry.url, app_name="routing-unit"))
    spec = {"serve": serve, "canary": canary_scope(serve)}

    async def scenario() -> None:
        board = RoutingBoard(spec)
        (one, fakes_one), (two, _) = canary_replicas(board, spec)
        loops = [asyncio.ensure_future(engine.link.run_exchange(0.02)) for engine in (one, two)]
        try:
            await asyncio.sleep(0.1)  # both replicas have exchanged once: the board knows them
            status = await board.canary(None, "start", V2, force=True,
                                        plan={"steps": [50, 100], "hold_s": 60, "min_requests": 1})
            assert status["status"]["weights"] == {V2: 50.0, V1: 50.0}
            for engine in (one, two):  # both replicas route on the board's split when start returns
                assert engine.canaries[""].weights == {V2: 50.0, V1: 50.0}
            fakes_one[V2].fail = RequestError("generation failed: RuntimeError", status_code=500)
            answered = await served(one, 12)
            assert V2 in answered and V1 in answered
            state = await board.canary(None, "status")
            for _ in range(50):  # the failures reach the board on the next exchange: the controller breaches there
                if state["canary"]["state"] != "running":
                    break
                await asyncio.sleep(0.02)
                state = await board.canary(None, "status")
            assert state["canary"]["state"] == "rolled_back" and "error rate" in state["canary"]["reason"]
            assert state["canary"]["routed_to_candidate"] == answered.count(V2)
            assert await served(two, 8) == [V1] * 8  # the other replica stopped routing to the candidate too
        finally:
            for loop in loops:
                loop.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
        board._control.cancel()

    asyncio.run(scenario())


def test_weights_set_by_hand_return_once_every_replica_routes_on_them(registry: Registry) -> None:
    serve = to_dict(ServeConfig(model=V1, registry=registry.url, app_name="routing-unit"))
    spec = {"serve": serve, "canary": canary_scope(serve)}

    async def scenario() -> None:
        board = RoutingBoard(spec)
        replicas = canary_replicas(board, spec, n=3)
        loops = [asyncio.ensure_future(engine.link.run_exchange(0.02)) for engine, _ in replicas]
        try:
            await asyncio.sleep(0.1)
            await board.canary(None, "set_weights", {V1: 50, V2: 50})
            for engine, _ in replicas:  # no replica is left on the old split when the call returns
                assert engine.canaries[""].weights == {V1: 50.0, V2: 50.0}
            pinned = {tuple(await served(engine, 3, key="alice")) for engine, _ in replicas}
            assert len(pinned) == 1 and len(set(next(iter(pinned)))) == 1  # one key, one version, every replica
        finally:
            for loop in loops:
                loop.cancel()
            await asyncio.gather(*loops, return_exceptions=True)

    asyncio.run(scenario())


def test_a_clean_plan_is_promoted_by_the_board_not_on_a_request(registry: Registry) -> None:
    serve = to_dict(ServeConfig(model=V1, registry=registry.url, app_name="routing-unit"))
    spec = {"serve": serve, "canary": canary_scope(serve, start=True,
                                                   plan={"steps": [100], "hold_s": 0, "min_requests": 2})}

    async def scenario() -> None:
        board = RoutingBoard(spec)
        [(engine, fakes)] = canary_replicas(board, spec, n=1)
        await engine.link.exchange()  # the board starts the configured canary
        await engine.link.exchange()
        assert await served(engine, 3) == [V2] * 3
        assert registry.aliases("tiny-lm")["production"] == 1  # serving requests moved nothing
        await engine.link.exchange()
        for _ in range(50):  # the board's control loop (every 0.1 s) promotes once the evidence is in
            if registry.aliases("tiny-lm")["production"] == 2:
                break
            await asyncio.sleep(0.1)
        assert registry.aliases("tiny-lm")["production"] == 2
        assert (await board.canary(None, "status", ))["stable"] == V2
        board._control.cancel()

    asyncio.run(scenario())


def test_a_canary_inside_one_region_splits_that_region_only(registry: Registry) -> None:
    cfg, serve_cfg = load_regions_config({"model": V1, "registry": registry.url, "app_name": "routing-unit",
                                          "regions": {"a": {"price_per_replica_hour": 1.0},
                                                      "b": {"price_per_replica_hour": 2.0}},
                                          "routing": {"policy": "round_robin", "eject_after_failures": 2}})
    spec = spec_of(cfg, serve_cfg)
    spec["regions"]["b"]["canary"] = {**canary_scope(spec["serve"], prefix="b--"), "weights": {V1: 50.0, V2: 50.0}}
    engine = RoutingEngine({"regions": {"a": None, "b": {V1: None, V2: None}}}, spec)
    plain, versions = FakeVersion("a"), {n: FakeVersion(f"b/{n}") for n in (V1, V2)}
    engine.regions.clients["a"] = plain  # type: ignore[union-attr]
    for name, fake in versions.items():
        engine.canaries["b"].versions[name].client = fake

    async def scenario() -> list[dict[str, str]]:
        seen = []
        for _ in range(24):
            slot: dict[str, Any] = {}
            token = _SLOT.set(slot)
            try:
                result = await engine.top.generate(request())
            finally:
                _SLOT.reset(token)
            headers = {k.decode(): v.decode() for k, v in routing_headers(slot)}
            seen.append({**headers, "text": result.choices[0].text})
        return seen

    seen = asyncio.run(scenario())
    in_a = [s for s in seen if s["x-llmstack-region"] == "a"]
    in_b = [s for s in seen if s["x-llmstack-region"] == "b"]
    assert in_a and all("x-llmstack-version" not in s and s["text"] == "answer from a" for s in in_a)
    assert {s["x-llmstack-version"] for s in in_b} == {V1, V2}  # region b splits between its versions
    assert all(s["text"] == f"answer from b/{s['x-llmstack-version']}" for s in in_b)

    versions[V2].fail = RequestError("generation failed: RuntimeError", status_code=500)
    failures_before = engine.regions.router.regions["b"].totals["failed"]  # type: ignore[union-attr]
    seen = asyncio.run(scenario())
    # a candidate's failure is retried in the other region, never held against region b's health
    assert all(s["text"] in ("answer from a", f"answer from b/{V1}") for s in seen)
    retried = [s for s in seen if s.get("x-llmstack-retried") == "1"]
    assert retried and all(s["x-llmstack-region"] == "a" and "x-llmstack-version" not in s for s in retried)
    assert engine.regions.router.regions["b"].healthy  # type: ignore[union-attr]
    assert engine.regions.router.regions["b"].totals["failed"] == failures_before  # type: ignore[union-attr]
