"""The router's engine client over fake regions (no Ray): the retry-once rule, health signals, cost, headers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from llmstack.errors import RequestError
from llmstack.serve.protocol import (ChoiceDelta, ChoiceOutput, GenerationChunk, GenerationRequest,
                                     GenerationResult, SamplingParams, Timing)
from llmstack.serve.routing.regions_config import load_regions_config, spec_of
from llmstack.serve.routing.regions import RegionEngineClient

UNAVAILABLE = RequestError("model backend unavailable (ActorDiedError); retry shortly", status_code=503,
                           type="service_unavailable", code="backend_unavailable")


class FakeRegion:
    """An engine-protocol double: answers, or fails with ``fail`` (before output, or after ``chunks_first``)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.fail: BaseException | None = None
        self.chunks_first = 0  # stream: chunks sent before failing
        self.calls = 0
        self.hang = False
        self.probe_hang = False  # the health check never answers (a dead node's actor)
        self.streamed: list[GenerationRequest] = []

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        self.calls += 1
        if self.hang:
            await asyncio.sleep(10)
        if self.fail is not None:
            raise self.fail
        return GenerationResult(request_id=request.request_id, model="tiny-lm", prompt_tokens=4,
                                completion_tokens=6, choices=[ChoiceOutput(index=0, text=self.name, token_ids=[1],
                                                                           finish_reason="length")],
                                timing=Timing(queue_s=0.0, total_s=0.36, batch_size=2))

    async def stream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        self.calls += 1
        self.streamed.append(request)
        if self.hang:  # no first chunk
            await asyncio.sleep(10)
        for i in range(3):
            if self.fail is not None and i >= self.chunks_first:
                raise self.fail
            yield GenerationChunk(request_id=request.request_id, model="tiny-lm",
                                  deltas=[ChoiceDelta(index=0, text=f"{self.name}{i}", token_ids=[10 + i])],
                                  finished=i == 2,
                                  prompt_tokens=4 if i == 2 else 0, completion_tokens=3 if i == 2 else 0,
                                  timing=Timing(total_s=0.1) if i == 2 else None)

    async def check_health(self) -> None:
        if self.probe_hang:
            await asyncio.sleep(10)
        if self.fail is not None:
            raise self.fail

    async def abort(self, request_id: str) -> bool:
        return False


def make(policy: str = "round_robin", **routing: Any) -> tuple[RegionEngineClient, dict[str, FakeRegion]]:
    cfg, serve_cfg = load_regions_config({"regions": {"a": {"price_per_replica_hour": 3.6},
                                                      "b": {"price_per_replica_hour": 1.8}},
                                          "routing": {"policy": policy, "eject_after_failures": 2, **routing}})
    client = RegionEngineClient({"a": None, "b": None}, spec_of(cfg, serve_cfg))
    fakes = {"a": FakeRegion("a"), "b": FakeRegion("b")}
    client.clients = fakes  # type: ignore[assignment]
    return client, fakes


def request() -> GenerationRequest:
    return GenerationRequest(model="tiny-lm", prompt="x", sampling=SamplingParams(max_tokens=4))


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_failed_request_is_retried_once_on_another_region() -> None:
    client, fakes = make(weights={"a": 1})
    fakes["a"].fail = UNAVAILABLE
    result = run(client.generate(request()))
    assert result.choices[0].text == "b" and fakes["a"].calls == 1
    assert not client.router.regions["a"].healthy  # backend gone: ejected at once


def test_never_retried_twice() -> None:
    client, fakes = make()
    for f in fakes.values():
        f.fail = RequestError("generation failed: RuntimeError", status_code=500)
    with pytest.raises(RequestError) as info:
        run(client.generate(request()))
    assert info.value.status_code == 500
    assert fakes["a"].calls + fakes["b"].calls == 2


def test_client_errors_are_not_retried_nor_held_against_the_region() -> None:
    client, fakes = make(weights={"a": 1})
    fakes["a"].fail = RequestError("bad max_tokens", status_code=400)
    with pytest.raises(RequestError):
        run(client.generate(request()))
    assert fakes["b"].calls == 0 and client.router.regions["a"].healthy
    assert client.router.regions["a"].failures == 0


def test_timeout_is_a_failure_and_retried() -> None:
    client, fakes = make(weights={"a": 1}, attempt_timeout_s=0.05)
    fakes["a"].hang = True
    assert run(client.generate(request())).choices[0].text == "b"
    assert client.router.regions["a"].failures == 1


def test_a_stream_without_a_first_chunk_times_out_as_a_timeout() -> None:
    async def collect(c: RegionEngineClient) -> list[str]:
        return [d.text for chunk in [x async for x in c.stream(request())] for d in chunk.deltas]

    client, fakes = make(weights={"a": 1}, attempt_timeout_s=0.05)
    fakes["a"].hang = True
    assert run(collect(client)) == ["b0", "b1", "b2"]  # retried on b
    fakes["b"].hang = True
    with pytest.raises(RequestError) as info:  # before the fix: closing the running stream made it a 500
        run(collect(client))
    assert info.value.status_code == 504 and info.value.code == "region_timeout"


def test_a_stream_the_caller_cancels_before_its_first_chunk_is_no_failure() -> None:
    # What the ingress does to a request its admission sheds while it waits, or to one whose client left.
    client, fakes = make(weights={"a": 1}, attempt_timeout_s=30)
    fakes["a"].hang = True

    async def cancel_waiting() -> None:
        task = asyncio.ensure_future(anext(aiter(client.stream(request()))))
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.wait({task})
        assert task.cancelled()

    for _ in range(3):  # more than eject_after_failures (2)
        run(cancel_waiting())
    region = client.router.regions["a"]
    assert region.healthy and region.failures == 0 and fakes["b"].calls == 0


def test_stream_not_started_is_retried_started_stream_continues_on_another_region() -> None:
    async def collect(c: RegionEngineClient) -> list[str]:
        return [d.text for chunk in [x async for x in c.stream(request())] for d in chunk.deltas]

    client, fakes = make(weights={"a": 1})
    fakes["a"].fail = UNAVAILABLE
    assert run(collect(client)) == ["b0", "b1", "b2"]

    client, fakes = make(weights={"a": 1})
    fakes["a"].fail, fakes["a"].chunks_first = UNAVAILABLE, 1
    got: list[str] = []

    async def partial() -> None:
        async for chunk in client.stream(request()):
            got.extend(d.text for d in chunk.deltas)

    run(partial())  # region a dies after one chunk: the stream continues on b after what a delivered
    assert got == ["a0", "b0", "b1", "b2"] and fakes["b"].calls == 1
    continuation = fakes["b"].streamed[0]
    assert continuation.resume_token_ids == [10] and continuation.resume_text_chars == len("a0")
    assert 'llmstack_region_resumed_streams_total{from_region="a",to_region="b"} 1.0' in \
        client.metrics.render(client.router)

    client, fakes = make(weights={"a": 1})  # still one other region at most: b failing too ends the stream
    for fake in fakes.values():
        fake.fail, fake.chunks_first = UNAVAILABLE, 1
    got.clear()
    with pytest.raises(RequestError):
        run(partial())
    assert got == ["a0", "b0"]


def test_cost_and_tokens_are_counted_per_region() -> None:
    client, fakes = make(weights={"b": 1})
    run(client.generate(request()))
    text = client.metrics.render(client.router)
    # 0.36 s shared by a batch of 2 = 0.18 replica-seconds at $1.8/h = $0.00009
    assert 'llmstack_region_cost_dollars_total{adapter="",model="tiny-lm",region="b"} 9e-05' in text
    assert 'llmstack_region_completion_tokens_total{adapter="",model="tiny-lm",region="b"} 6.0' in text


def test_probes_eject_and_readmit() -> None:
    client, fakes = make(readmit_after_probes=2)
    run(client.probe_all())  # both up once
    fakes["a"].fail = UNAVAILABLE

    async def rounds(n: int) -> None:
        for _ in range(n):
            await client.probe_all()

    run(rounds(2))
    assert not client.router.regions["a"].healthy
    fakes["a"].fail = None
    run(rounds(1))
    assert not client.router.regions["a"].healthy
    run(rounds(1))
    assert client.router.regions["a"].healthy


def test_health_fails_only_when_every_region_is_ejected() -> None:
    client, fakes = make()

    async def health() -> None:
        await client.check_health()

    client.router.failed("a", hard=True)
    run(health())
    client.router.failed("b", hard=True)
    with pytest.raises(RequestError, match="every region is ejected"):
        run(health())


def test_attempts_waiting_on_a_region_move_at_once_when_it_is_ejected() -> None:
    client, fakes = make(weights={"a": 1}, attempt_timeout_s=30)
    fakes["a"].hang = True

    async def scenario() -> tuple[str, float]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        pending = asyncio.ensure_future(client.generate(request()))
        await asyncio.sleep(0.05)
        client._failed("a", hard=True, reason="backend_unavailable")  # another request saw the region die
        result = await pending
        return result.choices[0].text, loop.time() - start

    text, took = run(scenario())
    assert text == "b" and took < 2  # not the 30 s attempt timeout
    assert client.router.regions["a"].in_flight == 0 and client.router.regions["a"].totals["moved"] == 1


def test_a_probe_unanswered_for_half_its_timeout_routes_around_the_region_before_it_fails() -> None:
    async def scenario() -> None:
        client, fakes = make("round_robin", probe_timeout_s=0.4)
        await client.probe_all()  # both seen up
        fakes["a"].probe_hang = True
        probe = asyncio.ensure_future(client.probe("a"))
        await asyncio.sleep(0.3)
        a = client.router.regions["a"]
        assert a.healthy and a.failures == 0 and client.status()["regions"]["a"]["suspect"] is True
        assert {client.router.choose().region for _ in range(4)} == {"b"}
        assert await probe is False  # timed out: now a failure, one short of ejection
        assert a.healthy and a.failures == 1
        fakes["a"].probe_hang = False
        assert await client.probe("a") is True
        assert {client.router.choose().region for _ in range(4)} == {"a", "b"}

    run(scenario())
