"""Admission by time (serve/http/admission.py): a burst larger than the timeout allows is shed with 503 +
Retry-After, and whatever is admitted finishes (no 504) — against an engine of fixed speed, in-process."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx

from llmstack.serve.http import make_api
from llmstack.serve.http.admission import Admission
from llmstack.serve.protocol import ChoiceDelta, GenerationChunk, GenerationRequest, GenerationResult, ModelCard

STEP_S = 0.01  # one decode step of the fake engine


class OneAtATimeEngine:
    """Serves one request at a time, ``STEP_S`` per token: a backend of known, fixed throughput."""

    def __init__(self) -> None:
        self.slot = asyncio.Semaphore(1)

    async def models(self) -> list[ModelCard]:
        return [ModelCard(id="m")]

    async def check_health(self) -> None:
        return None

    async def abort(self, request_id: str) -> bool:
        return False

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        raise NotImplementedError

    async def stream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        async with self.slot:
            steps = request.sampling.max_tokens or 1
            for i in range(steps):
                await asyncio.sleep(STEP_S)
                last = i == steps - 1
                yield GenerationChunk(request_id=request.request_id, model=request.model, finished=last,
                                      deltas=[ChoiceDelta(index=0, text="t", token_ids=[7],
                                                          finish_reason="length" if last else None)])


def test_a_burst_beyond_the_timeout_is_shed_early_and_the_admitted_finish() -> None:
    timeout_s = 2.0  # 60 streams x 10 steps x 10 ms = 6 s of work: about a third fits
    app = make_api(OneAtATimeEngine(), {"http": {"request_timeout_s": timeout_s}})

    async def main() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t",
                                     timeout=60) as c:
            body = {"prompt": "x", "max_tokens": 10, "stream": True}
            return list(await asyncio.gather(*[c.post("/v1/completions", json=body) for _ in range(60)]))

    responses = asyncio.run(main())
    statuses = [r.status_code for r in responses]
    assert 504 not in statuses and set(statuses) <= {200, 503}
    assert statuses.count(200) >= 5 and statuses.count(503) >= 5  # some served, the excess shed
    for r in responses:
        if r.status_code == 503:
            assert int(r.headers["Retry-After"]) >= 1 and r.json()["error"]["code"] == "overloaded"
        else:  # admitted: finished in full, no timeout event
            events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]" and len(events) == 11
            assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"


def test_nothing_is_refused_before_a_throughput_is_measured_and_the_refusal_names_the_timeout() -> None:
    admission = Admission(request_timeout_s=1.0, retry_after_s=1.0)
    tickets = [admission.admit(100, steps=100) for _ in range(50)]  # a cold burst: no estimate yet
    assert admission.throughput() is None and len(tickets) == 50
    admission._rate_busy_s, admission._rate_tokens = 1.0, 100.0  # measured: 100 tokens/s
    refusal = admission.refusal(tickets[-1])
    assert refusal is not None and refusal.status_code == 503 and "1 s request timeout" in refusal.message
    for ticket in tickets:
        admission.finish(ticket)
    assert admission.pending_tokens == 0 and admission.live == 0
    assert admission.admit(10, steps=10) is not None  # an idle queue admits again
