"""The region policy on the request path: a region per request, retried once elsewhere, costs counted.

:class:`RegionEngineClient` is the engine protocol over one engine per region: the region's ``LLMServer``
deployment, or a :class:`~llmstack.serve.routing.canary.CanaryEngine` when the region runs a canary. Each
request goes where :class:`~llmstack.serve.routing.region_policy.RegionRouter` says; its outcome (latency, failure,
timeout) feeds the router's health, and a probe task checks every region's replicas every
``probe_interval_s``. The answering region (and a non-streamed answer's cost) goes into the request's
routing slot (response headers, :mod:`.headers`). Several ingress replicas share overrides and ejections
through the board (:mod:`.board`, off the request path).

A canary candidate's failure is the canary's evidence, not the region's: it is retried elsewhere like any
failure but never counts toward ejecting the region.

Retry rule: a request that failed on a region before any output reached the client (a non-streamed
request, or a stream whose first chunk had not come) is retried once on another region; never twice,
never after output began, never for the caller's own mistakes (4xx).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from llmstack.config import ServeConfig, load_config
from llmstack.errors import LLMStackError, RequestError
from llmstack.serve.deployments.client import ServeEngineClient
from llmstack.serve.protocol import GenerationChunk, GenerationRequest, GenerationResult, ModelCard
from llmstack.serve.routing.cost import RegionMetrics, dollars, replica_seconds
from llmstack.serve.routing.region_policy import RegionRouter, nearest_rank
from llmstack.serve.routing.board import BoardLink, board_name, replica_id
from llmstack.serve.routing.headers import current_slot

logger = logging.getLogger("ray.serve")
HARD_CODES = ("backend_unavailable",)  # the region's backend is gone (dead actor, no replica): eject at once


class _Evicted(Exception):
    """The attempt's region was ejected while it waited: cancelled so another region can take it now."""


class _Attempt(Exception):
    """One region's attempt failed: ``error`` is what the caller gets; ``retryable`` whether another region may try."""

    def __init__(self, error: LLMStackError, *, retryable: bool) -> None:
        super().__init__(str(error))
        self.error = error
        self.retryable = retryable


class RegionEngineClient:
    """The engine protocol over one model deployment per region, routed by a :class:`RegionRouter`.

    Args:
        handles: region name -> ``DeploymentHandle`` of its ``LLMServer`` deployment.
        spec: :func:`~llmstack.serve.routing.regions_config.spec_of` data (serve config, routing, regions).
        clock: the router's clock (tests).
        connect: returns the routing board's handle (the app's ``RoutingBoard`` deployment).
        engines: region name -> the engine to use instead of a client over its handle (a region's canary).
    """

    def __init__(self, handles: dict[str, Any], spec: dict[str, Any], *, clock: Any = None,
                 connect: Any = None, engines: dict[str, Any] | None = None) -> None:
        self.spec = spec
        serve_cfg = load_config(ServeConfig, spec["serve"])
        regions = {name: {**r, "capacity": r["replicas"] * serve_cfg.deployment["max_ongoing_requests"]}
                   for name, r in spec["regions"].items()}
        self.router = RegionRouter(regions, spec["routing"], clock=clock)
        self.cfg = self.router.cfg
        engines = engines or {}
        # A failed request moves to another region (which resumes a started stream): resuming it inside a region
        # whose node died would wait for replicas that may never come back.
        self.clients = {name: engines.get(name) or ServeEngineClient(h, retry_after_s=serve_cfg.http.retry_after_s,
                                                                     resume_attempts=0)
                        for name, h in handles.items()}
        self.replica = replica_id()
        self.metrics = RegionMetrics(self.replica, int(spec["routing"].get("router_replicas", 1)))
        self.overheads: deque[float] = deque(maxlen=2000)  # recent router overheads (s), for status percentiles
        self._waiting: dict[str, set[asyncio.Task]] = {name: set() for name in handles}  # attempts with no output yet
        self._probe_tasks: dict[str, asyncio.Task] = {}
        self.board = None if not spec.get("deploy_id") else BoardLink(
            board_name(serve_cfg.app_name, spec["deploy_id"]), self.replica, apply_routing=self._adopt_routing,
            apply_ejection=self._peer_ejected, local_routing=self.routing_now,
            **({"connect": connect} if connect is not None else {}))
        self._board_task: asyncio.Task | None = None
        self._board_calls: set[asyncio.Task] = set()

    # ------------------------------------------------------------------ probes

    def start_probes(self) -> None:
        """Start (or restart) one probe loop per region and the board sync: a region that hangs delays
        only its own probes, so its first timed-out probe comes ``probe_timeout_s`` after it stopped answering."""
        loop = asyncio.get_running_loop()
        for name in self.clients:
            task = self._probe_tasks.get(name)
            if task is None or task.done():
                self._probe_tasks[name] = loop.create_task(self._probe_loop(name))
        if self.board is not None and (self._board_task is None or self._board_task.done()):
            self._board_task = loop.create_task(self.board.run(self.cfg.probe_interval_s))

    async def _probe_loop(self, name: str) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.probe(name)
            except asyncio.CancelledError:
                raise
            except Exception:  # never let the loop die
                logger.exception("region %s probe failed", name)
            await asyncio.sleep(max(0.05, self.cfg.probe_interval_s - (time.monotonic() - started)))

    async def probe(self, name: str) -> bool:
        """Probe one region once (its replicas' health check, bounded by ``probe_timeout_s``) and book it.
        Unanswered at half the timeout, the region is already suspect (routed around) while the probe waits on."""
        check = asyncio.ensure_future(self.clients[name].check_health())
        half = self.cfg.probe_timeout_s / 2
        try:
            done, _ = await asyncio.wait({check}, timeout=half)
            if not done:
                self.router.probe_slow(name)
                done, _ = await asyncio.wait({check}, timeout=half)
        except asyncio.CancelledError:
            check.cancel()
            raise
        if not done:
            check.cancel()
        ok = bool(done) and not check.cancelled() and (
            check.exception() is None or getattr(check.exception(), "canary_candidate", False))
        was = self.router.regions[name].healthy
        self.router.probed(name, ok)
        if was != self.router.regions[name].healthy:
            if ok:
                logger.warning("region %s re-admitted", name)
            else:
                self._ejected(name, "probes")
        return ok

    async def probe_all(self) -> dict[str, bool]:
        """Probe every region once, together."""
        names = list(self.clients)
        return dict(zip(names, await asyncio.gather(*(self.probe(n) for n in names))))

    def _ejected(self, name: str, reason: str) -> None:
        """The local router just ejected ``name``: move its waiting attempts now and tell the other replicas."""
        logger.warning("region %s ejected (%s)", name, reason)
        self._evict(name)
        if self.board is not None:
            task = asyncio.get_running_loop().create_task(self.board.publish_ejection(name, reason))
            self._board_calls.add(task)
            task.add_done_callback(self._board_calls.discard)

    def _peer_ejected(self, name: str, reason: str) -> None:
        if name in self.router.regions and self.router.eject(name, reason=reason):
            logger.warning("region %s ejected (%s)", name, reason)
            self._evict(name)

    def _adopt_routing(self, routing: dict[str, Any]) -> None:
        self.router.set_routing(policy=routing.get("policy"), slo_p95_s=routing.get("slo_p95_s"))
        self.router.set_weights(routing.get("weights") or {})

    def routing_now(self) -> dict[str, Any]:
        return {"policy": self.router.cfg.policy, "slo_p95_s": self.router.cfg.slo_p95_s,
                "weights": dict(self.router.weights)}

    async def share_routing(self) -> bool | None:
        """Publish this replica's routing to the others (None: no board, a lone router)."""
        return None if self.board is None else await self.board.publish_routing(self.routing_now())

    # ------------------------------------------------------------------ engine protocol

    async def models(self) -> list[ModelCard]:
        """The model list of the first healthy region that answers (every region serves the same model)."""
        last: Exception | None = None
        order = sorted(self.clients, key=lambda n: not self.router.regions[n].healthy)
        for name in order:
            try:
                return await asyncio.wait_for(self.clients[name].models(), timeout=self.cfg.attempt_timeout_s)
            except (LLMStackError, asyncio.TimeoutError) as exc:
                last = exc
        raise _unavailable(last)

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        self.start_probes()
        entered = time.perf_counter()
        outside = 0.0  # time in the backend call and the network offset: not the router's own
        tried: list[str] = []
        while True:
            name = self._next_region(tried)
            began = time.perf_counter()
            try:
                result = await self._generate_on(name, request)
            except _Attempt as failure:
                outside += time.perf_counter() - began
                if failure.retryable and len(tried) == 1 and self._another(tried):
                    continue
                raise failure.error from None
            outside += time.perf_counter() - began
            self._answered(name, result.model, request, result.timing, result.cached,
                           result.prompt_tokens, result.completion_tokens)
            overhead = max(0.0, time.perf_counter() - entered - outside)
            self.metrics.overhead.observe(overhead)
            self.overheads.append(overhead)
            return result

    async def _generate_on(self, name: str, request: GenerationRequest) -> GenerationResult:
        state = self.router.regions[name]
        client = self.clients[name]
        self.router.begin(name)
        start = time.perf_counter()
        try:
            if state.latency_s:
                await asyncio.sleep(state.latency_s)  # the stand-in for the network distance to the region
            result = await self._bounded(name, client.generate(request))
        except BaseException as exc:
            raise self._attempt_failed(name, exc) from None
        latency = time.perf_counter() - start
        self.router.succeeded(name, latency)
        self.metrics.requests.labels(name, "ok").inc()
        self.metrics.latency.labels(name).observe(latency)
        return result

    async def stream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """The request's chunks from one region; a retryable failure moves it (once) to another region: from the
        start if nothing was sent, else as a continuation after the ids already delivered (n=1), so the client
        sees one stream."""
        self.start_probes()
        tried: list[str] = []
        delivered: list[int] = []  # ids sent to the caller, and the characters of their text
        chars = 0
        current = request
        resumed_from: str | None = None  # the region whose started stream this attempt continues
        while True:
            name = self._next_region(tried)
            if resumed_from is not None:
                self.metrics.resumed.labels(resumed_from, name).inc()
            started = False
            try:
                async with contextlib.aclosing(self._stream_on(name, current)) as chunks:
                    async for chunk in chunks:
                        started = True
                        chunk.resumed += current is not request
                        for delta in chunk.deltas:
                            delivered += delta.token_ids
                            chars += len(delta.text)
                        yield chunk
                return
            except _Attempt as failure:
                resumable = not started or request.sampling.n == 1
                if failure.retryable and resumable and len(tried) == 1 and self._another(tried):
                    if started:
                        resumed_from = name
                        current = request.model_copy(update={
                            "resume_token_ids": request.resume_token_ids + delivered,
                            "resume_text_chars": request.resume_text_chars + chars})
                    continue
                raise failure.error from None

    async def _stream_on(self, name: str, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        state = self.router.regions[name]
        self.router.begin(name)
        start = time.perf_counter()
        ended = False
        try:
            if state.latency_s:
                await asyncio.sleep(state.latency_s)
            async with contextlib.aclosing(self.clients[name].stream(request)) as source:
                try:
                    first = await self._bounded(name, source.__anext__())
                except StopAsyncIteration:
                    first = None
                last = first
                if first is not None:
                    yield first
                    async for chunk in source:
                        last = chunk
                        yield chunk
            latency = time.perf_counter() - start
            ended = True
            self.router.succeeded(name, latency)
            self.metrics.requests.labels(name, "ok").inc()
            self.metrics.latency.labels(name).observe(latency)
            if last is not None:
                self._answered(name, last.model, request, last.timing, last.cached, last.prompt_tokens,
                               last.completion_tokens)
        except GeneratorExit:  # the client left mid-stream: no evidence about the region
            if not ended:
                ended = True
                self.router.released(name)
                self.metrics.requests.labels(name, "cancelled").inc()
            raise
        except BaseException as exc:
            if ended:
                raise
            ended = True
            raise self._attempt_failed(name, exc) from None

    async def _bounded(self, name: str, awaitable: Any) -> Any:
        """The region's answer (or first chunk) within ``attempt_timeout_s``; given up at once (``_Evicted``) if
        the region is ejected meanwhile, so the request moves to another region instead of waiting out the timeout."""
        task = asyncio.ensure_future(awaitable)
        waiting = self._waiting.setdefault(name, set())
        waiting.add(task)
        try:
            done, _ = await asyncio.wait({task}, timeout=self.cfg.attempt_timeout_s)
        except asyncio.CancelledError:  # the caller gave up (left, or shed by the ingress's admission)
            await _cancelled(task)
            raise
        finally:
            waiting.discard(task)
        if not done:
            await _cancelled(task)
            raise asyncio.TimeoutError
        if task.cancelled():
            raise _Evicted(name)
        return task.result()

    def _evict(self, name: str) -> None:
        """Cancel the attempts still waiting on an ejected region (they are retried elsewhere)."""
        for task in list(self._waiting.get(name, ())):
            task.cancel()

    def _attempt_failed(self, name: str, exc: BaseException) -> BaseException:
        """Book a failed attempt on the region and say whether another region may retry it."""
        if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):  # the caller gave up: no evidence
            self.router.released(name)
            self.metrics.requests.labels(name, "cancelled").inc()
            return exc
        if isinstance(exc, _Evicted):  # the region was ejected while this waited: no further evidence
            self.router.released(name, moved=True)
            self.metrics.requests.labels(name, "evicted").inc()
            error = RequestError(f"region {name} was ejected while the request waited", status_code=503,
                                 type="service_unavailable", code="region_ejected",
                                 headers={"Retry-After": "1"})
            return _Attempt(error, retryable=True)
        if isinstance(exc, asyncio.TimeoutError):
            self._failed(name, reason="timeout")
            self.metrics.requests.labels(name, "failed").inc()
            error = RequestError(f"region {name} did not answer within {self.cfg.attempt_timeout_s:g} s",
                                 status_code=504, type="timeout_error", code="region_timeout")
            return _Attempt(error, retryable=True)
        error = exc if isinstance(exc, LLMStackError) else RequestError(
            f"region {name} failed: {type(exc).__name__}", status_code=500, type="server_error")
        if getattr(error, "canary_candidate", False):  # the canary's evidence, not the region's
            self.router.released(name)
            self.metrics.requests.labels(name, "failed").inc()
            return _Attempt(error, retryable=error.status_code >= 500)
        if error.status_code < 500:  # the caller's mistake: the same on every region
            self.router.released(name)
            self.metrics.requests.labels(name, "client_error").inc()
            return _Attempt(error, retryable=False)
        if error.code == "overloaded":  # full, not broken: try elsewhere, no health penalty
            self.router.released(name)
            self.metrics.requests.labels(name, "shed").inc()
            return _Attempt(error, retryable=True)
        self._failed(name, hard=error.code in HARD_CODES, reason=error.code or error.type)
        self.metrics.requests.labels(name, "failed").inc()
        return _Attempt(error, retryable=True)

    def _failed(self, name: str, *, hard: bool = False, reason: str) -> None:
        was = self.router.regions[name].healthy
        self.router.failed(name, hard=hard, reason=reason)
        if was and not self.router.regions[name].healthy:
            self._ejected(name, reason)

    def _another(self, tried: list[str]) -> bool:
        return any(n not in tried for n in self.router.regions)

    def _next_region(self, tried: list[str]) -> str:
        """The region of the next attempt (not one in ``tried``, which it joins), booked in metrics and headers."""
        choice = self.router.choose(exclude=tried)
        self._note_choice(choice, tried)
        tried.append(choice.region)
        return choice.region

    def _note_choice(self, choice: Any, tried: list[str]) -> None:
        if tried:
            self.metrics.retries.labels(tried[-1], choice.region).inc()
        if not choice.slo_met:
            self.metrics.slo_missed.labels(choice.region).inc()
        slot = current_slot()
        slot["region"] = choice.region
        slot["retried"] = bool(tried)
        slot.pop("version", None)  # a region's canary names its version when it routes

    def _answered(self, name: str, model: str, request: GenerationRequest, timing: Any, cached: bool,
                  prompt_tokens: int, completion_tokens: int) -> None:
        seconds = replica_seconds(timing, cached=cached)
        cost = dollars(seconds, self.router.regions[name].price)
        adapter = request.model if request.model != model else ""
        self.metrics.answered(name, model, adapter, seconds=seconds, cost=cost, prompt_tokens=prompt_tokens,
                              completion_tokens=completion_tokens)
        slot = current_slot()
        slot["cost"] = slot.get("cost", 0.0) + cost

    async def abort(self, request_id: str) -> bool:
        results = await asyncio.gather(*(c.abort(request_id) for c in self.clients.values()), return_exceptions=True)
        return any(r is True for r in results)

    async def check_health(self) -> None:
        """The app is up while at least one region takes traffic."""
        self.start_probes()
        if not any(s.healthy for s in self.router.regions.values()):
            raise RequestError("every region is ejected (failing requests or probes)", status_code=503,
                               type="service_unavailable", code="no_region")

    def status(self) -> dict[str, Any]:
        """The router's status, its clock readings also as wall-clock times (``*_wall`` / ``at``)."""
        status = self.router.status()
        offset = time.time() - self.router.clock()
        for name, region in status["regions"].items():
            region["deployment"] = self.spec["regions"][name]["deployment"]
            region["resource"] = self.spec["regions"][name]["resource"]
            state = self.router.regions[name]
            for key, value in (("ejected_at", state.ejected_at), ("readmitted_at", state.readmitted_at),
                               ("last_routed_at", state.last_routed_at)):
                region[key + "_wall"] = None if value is None else value + offset
        for event in status["events"]:
            event["at"] = event["t"] + offset
        status["replica"] = self.replica
        status["board"] = None if self.board is None else self.board.status()
        recent = list(self.overheads)
        status["router_overhead_s"] = {"n": len(recent), "p50": nearest_rank(recent, 50),
                                       "p95": nearest_rank(recent, 95)}
        return status


def _unavailable(exc: BaseException | None) -> LLMStackError:
    if isinstance(exc, LLMStackError):
        return exc
    return RequestError("no region answered", status_code=503, type="service_unavailable", code="no_region")


async def _cancelled(task: asyncio.Future) -> None:
    """Cancel ``task`` (a stream's pending ``__anext__``) and wait until it has stopped: closing the stream while
    it still runs raises RuntimeError, which would count a caller's cancellation (a client that left, a request
    the ingress shed by admission) or a timeout as the region's failure."""
    task.cancel()
    await asyncio.wait({task})
