"""The canary policy on the request path: one version per request by weight, sticky by session key.

:class:`CanaryEngine` is the engine protocol over the versions of one canary (the app's own, or one region's).
It routes on the weights it last adopted from the board (:mod:`.board`), measures every answer (latency,
time to first token, errors, empty or degenerate outputs), mirrors a share of stable traffic to the
candidate in a shadow phase, and hands what it saw to the board on the next exchange. It decides nothing
about the rollout: the board's :class:`~llmstack.serve.routing.rollout.CanaryScope` does, off the request path.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from llmstack.errors import LLMStackError, RequestError
from llmstack.serve.routing.kpis import is_degenerate
from llmstack.serve.deployments.client import ServeEngineClient
from llmstack.serve.protocol import GenerationChunk, GenerationRequest, GenerationResult, ModelCard
from llmstack.serve.routing.headers import current_slot

MAX_SHADOWS = 64  # mirrored requests in flight per replica, at most


@dataclass
class _Version:
    name: str
    ref: str | None
    client: Any  # the engine protocol of its model deployment
    cards: list[ModelCard] | None = None


class CanaryEngine:
    """The engine protocol over one canary's versions.

    Args:
        scope: "" for a canary app, else the region this canary sits in.
        spec: the scope's resolved data (versions, stable, weights).
        clients: version name -> its engine (a ``ServeEngineClient`` over the model deployment).
        connect: makes the engine of a version added at run time from ``(deployment, app)``.
        metrics: the canary part of the layer's metrics (:class:`~llmstack.serve.routing.metrics.CanaryMetrics`).
        notify: called when a non-stable version answers badly (the board should hear of it now, not later).
    """

    def __init__(self, scope: str, spec: dict[str, Any], clients: dict[str, Any], *,
                 connect: Callable[[str, str], Any], metrics: Any,
                 notify: Callable[[], None] = lambda: None) -> None:
        self.scope = scope
        refs = {v["name"]: v["ref"] for v in spec["versions"]}
        self.versions = {name: _Version(name=name, ref=refs.get(name), client=client)
                         for name, client in clients.items()}
        self.stable: str = spec["stable"]
        self.weights: dict[str, float] = dict(spec["weights"])
        self.epoch = 0  # the board's epoch this replica routes on (0: the spec's, none adopted yet)
        self.shadow: dict[str, Any] | None = None  # {"candidate", "share"} during a shadow phase
        self.rows: dict[str, dict[str, Any]] = {}  # the board's KPI rows per version (for /metrics)
        self.transitions: dict[str, int] = {}
        self.connect = connect
        self.metrics = metrics
        self.notify = notify
        self._finished: list[list[Any]] = []  # [version, finished at (monotonic), latency, ttft, error, bad, shadow]
        self._in_flight: dict[int, tuple[str, float]] = {}
        self._next = 0
        self._routed: Counter[str] = Counter()
        self._compared = [0, 0]  # shadow answers compared, agreeing
        self._shadows: set[asyncio.Task] = set()

    # ------------------------------------------------------------------ board exchange

    def report(self) -> dict[str, Any]:
        """What this replica saw since the last exchange (times as ages), and the epoch it routes on."""
        now = time.monotonic()
        finished, self._finished = self._finished, []
        in_flight: dict[str, list[float]] = {}
        for version, started in self._in_flight.values():
            in_flight.setdefault(version, []).append(now - started)
        routed, self._routed = dict(self._routed), Counter()
        compared, self._compared = self._compared, [0, 0]
        return {"epoch": self.epoch, "routed": routed, "in_flight": in_flight, "shadow": compared,
                "obs": [[v, now - t, latency, ttft, error, bad, shadow]
                        for v, t, latency, ttft, error, bad, shadow in finished]}

    def adopt(self, view: dict[str, Any]) -> None:
        """Route on the board's view from now on (versions added at run time get an engine here)."""
        for v in view["versions"]:
            if v["name"] not in self.versions:
                self.versions[v["name"]] = _Version(name=v["name"], ref=v["ref"],
                                                    client=self.connect(v["deployment"], v["app"]))
        self.stable, self.weights, self.shadow = view["stable"], dict(view["weights"]), view["shadow"]
        self.rows, self.transitions = view["rows"], view["transitions"]
        self.epoch = view["epoch"]

    # ------------------------------------------------------------------ routing

    def _ordered(self) -> list[str]:
        """Versions in routing order: non-stable first, so raising a candidate's share only moves keys onto it."""
        return sorted((n for n in self.weights if n != self.stable)) + [self.stable]

    def pick(self, key: str | None) -> str:
        if key:
            point = int(hashlib.sha256(key.encode()).hexdigest()[:12], 16) % 1_000_000 / 10_000.0
        else:
            point = random.random() * 100.0
        total = 0.0
        chosen = self.stable
        for name in self._ordered():
            weight = self.weights.get(name, 0.0)
            if weight <= 0:
                continue
            total += weight
            chosen = name
            if point < total:
                return name
        return chosen

    def _route(self) -> _Version:
        slot = current_slot()
        name = self.pick(slot.get("key"))
        slot["version"] = name
        self._routed[name] += 1
        self.metrics.routed(self.scope, name)
        return self.versions[name]

    async def _normalize(self, request: GenerationRequest, version: _Version) -> GenerationRequest:
        """Name the target version's base model for base-model requests (aliases differ between versions)."""
        stable = self.versions[self.stable]
        for v in (stable, version):
            if v.cards is None:
                v.cards = await v.client.models()
        base_names = set()
        for v in {stable.name: stable, version.name: version}.values():
            for card in v.cards or []:
                if card.parent is None:
                    base_names |= {card.id, *(card.aliases or [])} | ({card.root} if card.root else set())
        if request.model in base_names:
            target = next(c.id for c in version.cards or [] if c.parent is None)
            if target != request.model:
                request = request.model_copy(update={"model": target})
        return request

    def _begin(self, version: str) -> int:
        self._next += 1
        self._in_flight[self._next] = (version, time.monotonic())
        return self._next

    def _end(self, token: int, version: str, started: float, *, ttft: float | None = None, error: bool = False,
             bad: bool = False, shadow: bool = False, cancelled: bool = False) -> None:
        self._in_flight.pop(token, None)
        if cancelled:  # the client left: no evidence either way
            return
        now = time.monotonic()
        self._finished.append([version, now, now - started, ttft, error, bad, shadow])
        self.metrics.observe(self.scope, version, latency=now - started, ttft=ttft, error=error, bad=bad,
                             shadow=shadow)
        if (error or bad) and version != self.stable:
            self.notify()

    def _failed(self, version: _Version, exc: BaseException) -> LLMStackError:
        """The caller's error for a version's failure, marked with the version (header) and its role."""
        error = exc if isinstance(exc, LLMStackError) else RequestError(
            f"version {version.name} failed: {type(exc).__name__}", status_code=500, type="server_error")
        error.version = version.name  # type: ignore[attr-defined]
        error.canary_candidate = version.name != self.stable  # type: ignore[attr-defined]
        return error

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        version = self._route()
        reference = self._mirror(request) if self._shadow_on(version.name) else None
        try:
            result = await self._call(version, request)
        except BaseException:
            if reference is not None and not reference.done():
                reference.set_result(None)
            raise
        if reference is not None and not reference.done():
            reference.set_result(result)
        return result

    async def _call(self, version: _Version, request: GenerationRequest, *, shadow: bool = False) -> GenerationResult:
        token = self._begin(version.name)
        started = time.monotonic()
        try:
            result = await version.client.generate(await self._normalize(request, version))
        except asyncio.CancelledError:
            self._end(token, version.name, started, cancelled=True)
            raise
        except BaseException as exc:
            error = self._failed(version, exc)
            self._end(token, version.name, started, error=error.status_code >= 500, shadow=shadow)
            if error is exc:
                raise
            raise error from None
        bad = any(is_degenerate(c.text, c.token_ids) for c in result.choices)
        self._end(token, version.name, started, ttft=result.timing.ttft_s if result.timing else None, bad=bad,
                  shadow=shadow)
        return result

    async def stream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        version = self._route()
        if self._shadow_on(version.name):
            self._mirror(request).set_result(None)  # streamed answers are not compared, only measured
        token = self._begin(version.name)
        started = time.monotonic()
        ttft = None
        texts: dict[int, list[str]] = {}
        ids: dict[int, list[int]] = {}
        try:
            async for chunk in version.client.stream(await self._normalize(request, version)):
                for d in chunk.deltas:
                    texts.setdefault(d.index, []).append(d.text)
                    ids.setdefault(d.index, []).extend(d.token_ids)
                    if ttft is None and d.text:
                        ttft = time.monotonic() - started
                yield chunk
        except (asyncio.CancelledError, GeneratorExit):
            self._end(token, version.name, started, cancelled=True)
            raise
        except BaseException as exc:
            error = self._failed(version, exc)
            self._end(token, version.name, started, error=error.status_code >= 500)
            if error is exc:
                raise
            raise error from None
        bad = any(is_degenerate("".join(texts.get(i, [])), ids.get(i)) for i in (texts or {0: []}))
        self._end(token, version.name, started, ttft=ttft, bad=bad)

    # ------------------------------------------------------------------ shadow mode

    def _shadow_on(self, routed: str) -> bool:
        s = self.shadow
        return (s is not None and routed == self.stable and s["candidate"] in self.versions
                and len(self._shadows) < MAX_SHADOWS and random.random() < s["share"])

    def _mirror(self, request: GenerationRequest) -> asyncio.Future:
        """Send a copy to the candidate in the background; its answer is measured and compared, never returned.

        Returns the future the caller resolves with the stable version's answer.
        """
        assert self.shadow is not None
        candidate = self.versions[self.shadow["candidate"]]
        loop = asyncio.get_running_loop()
        reference: asyncio.Future = loop.create_future()
        copy = request.model_copy(update={"request_id": request.request_id + "-shadow"})

        async def run() -> None:
            try:
                result = await self._call(candidate, copy, shadow=True)
            except Exception:  # measured by _call; a mirrored answer is never returned
                result = None
            try:
                stable = await asyncio.wait_for(asyncio.shield(reference), timeout=120)
            except asyncio.TimeoutError:
                return
            # Only deterministic requests (greedy or seeded) can be expected to agree.
            if request.sampling.deterministic and isinstance(result, GenerationResult) \
                    and isinstance(stable, GenerationResult):
                self._compared[0] += 1
                self._compared[1] += int([x.text for x in result.choices] == [x.text for x in stable.choices])

        task = loop.create_task(run())
        self._shadows.add(task)
        task.add_done_callback(self._shadows.discard)
        return reference

    # ------------------------------------------------------------------ the rest of the engine protocol

    async def models(self) -> list[ModelCard]:
        stable = self.versions[self.stable]
        if stable.cards is None:
            stable.cards = await stable.client.models()
        return stable.cards

    async def check_health(self) -> None:
        """Health of what serves traffic (every version with a weight); raises when one is down. A down
        candidate's error is marked ``canary_candidate`` (the canary's evidence, not its region's)."""
        stable = self.versions[self.stable]
        others = [self.versions[n] for n in self.weights if n in self.versions and n != self.stable]
        results = await asyncio.gather(stable.client.check_health(), *(v.client.check_health() for v in others),
                                       return_exceptions=True)
        for version, result in zip([stable, *others], results):
            if isinstance(result, BaseException):
                raise self._failed(version, result)

    async def abort(self, request_id: str) -> bool:
        """Cancel a request on whichever version holds it."""
        results = await asyncio.gather(*(v.client.abort(request_id) for v in self.versions.values()),
                                       return_exceptions=True)
        return any(r is True for r in results)


def serve_client(retry_after_s: float) -> Callable[[str, str], ServeEngineClient]:
    """The engine of a version deployed at run time (a side application), from its deployment and app names."""

    def connect(deployment: str, app: str) -> ServeEngineClient:
        from ray import serve

        return ServeEngineClient(serve.get_deployment_handle(deployment, app_name=app), retry_after_s=retry_after_s)

    return connect
