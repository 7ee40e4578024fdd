"""One canary's owner, off the request path: versions, weights, live KPIs, the rollout controller, promotion.

It lives in the routing board (:mod:`.board`), one per canary (the app's own, or a region's). Ingress
replicas route on the weights it publishes and send it what they saw (finished requests, requests in
flight, shadow comparisons) every :data:`~.board.EXCHANGE_S`; it feeds those to the KPI windows and the
:class:`~llmstack.serve.routing.controller.RolloutController`, ticks the plan, and moves the registry alias
(``Registry.promote`` / ``rollback``) here, never while a request waits. A weight change made by hand
(start, promote, abort, rollback, weights) returns once every live ingress replica routes on it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from llmstack.config import ServeConfig, load_config, to_dict
from llmstack.errors import ArtifactNotFoundError, ConfigError, LLMStackError, ValidationFailedError
from llmstack.registry import ArtifactRef
from llmstack.serve.routing.canary_config import (CanaryConfig, CanaryError, CanaryPlan, CanaryThresholds, check_weights,
                                          refusal)
from llmstack.serve.routing.controller import PROMOTE, RolloutController
from llmstack.serve.routing.kpis import KPIWindow, Observation

logger = logging.getLogger("ray.serve")

ROWS_TTL_S = 1.0  # the KPI rows the replicas show on /metrics are summarized at most this often


@dataclass
class _Version:
    name: str
    ref: str | None
    app: str
    deployment: str
    kpi: KPIWindow = field(default_factory=KPIWindow)
    in_flight: dict[str, list[float]] = field(default_factory=dict)  # replica -> start times (board clock)


class CanaryScope:
    """The state of one canary (``scope`` "" for a canary app, else the region's name).

    Args:
        spec: the scope's resolved data (:func:`~llmstack.serve.routing.canary_config.resolve_scope`).
        serve: the app's ServeConfig as a dict; app_name: the Serve application it belongs to.
        settled: awaited after a weight change by hand: returns once the ingress replicas route on it.
        resource: the region's marker resource (versions added at run time are pinned to it).
    """

    def __init__(self, scope: str, spec: dict[str, Any], *, serve: dict[str, Any], app_name: str,
                 settled: Callable[[str, int], Awaitable[bool]], resource: str | None = None) -> None:
        from llmstack.registry import Registry

        self.scope = scope
        self.spec = spec
        self.serve_cfg = load_config(ServeConfig, serve)
        self.cfg = load_config(CanaryConfig, spec["canary"])
        self.registry = Registry(self.serve_cfg.registry)
        self.app_name = app_name
        self.resource = resource
        self.settled = settled
        self.versions: dict[str, _Version] = {
            v["name"]: _Version(name=v["name"], ref=v["ref"], app=app_name, deployment=v["deployment"])
            for v in spec["versions"]}
        self.stable = spec["stable"]
        self.previous: str | None = None
        self.weights: dict[str, float] = dict(spec["weights"])
        self.epoch = 1  # bumped on every change the ingress replicas must adopt (weights, versions, shadow)
        self.canary: RolloutController | None = None
        self.history: list[dict[str, Any]] = []  # canaries that ended, newest last
        self.events: deque[dict[str, Any]] = deque(maxlen=200)
        self.transitions: Counter[str] = Counter()  # canaries started and how they ended
        self._tasks: set[asyncio.Task] = set()
        self._lock = asyncio.Lock()
        self._rows: tuple[float, dict[str, Any]] = (float("-inf"), {})  # KPI rows for /metrics, and when

    async def begin(self) -> None:
        """Start the configured canary (``start: true``); a refused start serves the stable version and says why."""
        if self.cfg.start and self.spec.get("candidate"):
            try:
                await self.start(self.spec["candidate"], force=self.cfg.force, wait=False)
            except LLMStackError as exc:
                self._event("start_refused", error=type(exc).__name__, message=str(exc))
                logger.warning("canary not started: %s", exc)

    # ------------------------------------------------------------------ what the ingress replicas send and get

    def ingest(self, replica: str, report: dict[str, Any]) -> None:
        """One replica's news since its last exchange: finished requests, requests in flight, shadow results.

        Times arrive as ages (seconds before now), so replicas on other nodes need no shared clock.
        """
        now = time.monotonic()
        for version, n in report.get("routed", {}).items():
            if self.canary is not None:
                for _ in range(int(n)):
                    self.canary.routed(version)
        in_flight = report.get("in_flight", {})  # this replica's requests in flight now, per version
        for v in self.versions.values():
            v.in_flight[replica] = [now - age for age in in_flight.get(v.name, ())]
            starts = [t for replica_starts in v.in_flight.values() for t in replica_starts]
            v.kpi.in_flight = dict(enumerate(starts))
        for version, age, latency, ttft, error, bad, shadow in report.get("obs", ()):
            if version not in self.versions:
                continue
            obs = Observation(now - age, latency, ttft, error, bad, shadow)
            self.versions[version].kpi.record(obs)
            if self.canary is not None:
                self.canary.observe(version, obs)  # a breach drops the candidate's share right here
        compared, agreed = report.get("shadow", (0, 0))
        if self.canary is not None:
            for i in range(int(compared)):
                self.canary.shadow_compared_with(i < agreed)

    def view(self) -> dict[str, Any]:
        """What every replica routes on: weights, versions, the shadow phase; and the KPI rows for /metrics."""
        c = self.canary
        shadow = None
        if c is not None and c.running and c.step == -1 and c.plan.shadow_share > 0:
            shadow = {"candidate": c.candidate, "share": c.plan.shadow_share}
        now = time.monotonic()
        if now - self._rows[0] > ROWS_TTL_S or set(self._rows[1]) != set(self.versions):
            window = self.cfg.thresholds.window_s
            self._rows = (now, {n: KPIWindow.summarize([o for o in v.kpi.window(0, now, window) if not o.shadow])
                                for n, v in self.versions.items()})
        rows = self._rows[1]
        return {"epoch": self.epoch, "stable": self.stable, "weights": dict(self.weights), "shadow": shadow,
                "versions": [{"name": v.name, "ref": v.ref, "app": v.app, "deployment": v.deployment}
                             for v in self.versions.values()],
                "rows": rows, "transitions": dict(self.transitions)}

    def _changed(self) -> None:
        self.epoch += 1

    async def tick(self) -> None:
        """One control step (the board calls it every 0.1 s): advance the plan, promote when it ends clean."""
        c = self.canary
        if c is None or not c.running:
            return
        try:
            if c.tick() == PROMOTE:
                async with self._lock:
                    await self._promote(c, force=c.force, reason=f"canary plan {c.plan.steps} clean", auto=True)
        except Exception:  # the controller must survive anything
            logger.exception("canary controller step failed")

    def _new_controller(self, candidate: str, plan: CanaryPlan, thresholds: CanaryThresholds,
                        force: bool) -> RolloutController:
        kpis = {name: v.kpi for name, v in self.versions.items()}

        def on_share(share: float) -> None:
            weights = {candidate: share, self.stable: 100.0 - share}
            self.weights = {k: v for k, v in weights.items() if v > 0} or {self.stable: 100.0}
            self._changed()
            self._event("weights", weights=dict(self.weights))

        def on_end(state: str, reason: str) -> None:
            self._ended(state, reason)

        return RolloutController(candidate=candidate, stable=self.stable, plan=plan, thresholds=thresholds,
                                 force=force, kpis=kpis, on_share=on_share, on_end=on_end)

    def _ended(self, state: str, reason: str) -> None:
        c = self.canary
        assert c is not None
        if state != "promoted":
            self.weights = {c.stable: 100.0}
        self._changed()
        self.transitions[state] += 1
        self._event(state, candidate=c.candidate, reason=reason)
        logger.warning("canary %s: %s (%s)", c.candidate, state, reason)
        summary = self._canary_status(c)
        self.history.append(summary)
        ref = self.versions[c.candidate].ref
        if ref:  # record the outcome on the candidate's immutable version
            task = asyncio.get_running_loop().create_task(self._annotate(ref, summary))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _annotate(self, ref: str, summary: dict[str, Any]) -> None:
        try:
            await asyncio.to_thread(self.registry.annotate, ref, "canary", json.loads(json.dumps(summary, default=str)))
        except Exception as exc:  # recording must never break routing
            logger.warning("could not annotate %s: %s", ref, exc)

    async def _promote(self, c: RolloutController, *, force: bool, reason: str, auto: bool = False) -> dict[str, Any]:
        """Move the registry alias to the candidate (through Registry.promote's gate), then route all to it."""
        cand = self.versions[c.candidate]
        event = None
        if cand.ref:
            try:
                ref = ArtifactRef.concrete(cand.ref)
                held = (await asyncio.to_thread(self.registry.aliases, ref.name)).get(self.cfg.alias)
                if held != ref.version:
                    event = await asyncio.to_thread(self.registry.promote, ref, self.cfg.alias, force=force,
                                                    reason=reason)
            except LLMStackError as exc:
                if auto and c.running:
                    c.end("promotion_refused", str(exc))
                raise
        self.previous = c.stable
        self.stable = c.candidate
        self.weights = {c.candidate: 100.0}
        self._changed()
        c.end("promoted", reason + (" (forced)" if event and event.get("forced") else ""))
        self.history[-1]["registry_event"] = event
        return {"registry_event": event}

    # ------------------------------------------------------------------ admin (handle methods)

    def _event(self, kind: str, **data: Any) -> None:
        self.events.append({"at": time.time(), "event": kind, **data})

    def _canary_status(self, c: RolloutController) -> dict[str, Any]:
        return c.status(candidate_ref=self.versions[c.candidate].ref)

    async def status(self) -> dict[str, Any]:
        """Versions, weights, per-version KPIs (last window), and the canary in progress or last ended.

        Answered once every live ingress replica routes on the current weights, so the counts include every
        request routed under the previous ones (e.g. to a candidate just rolled back).
        """
        await self._settle()
        now = time.monotonic()
        window = self.cfg.thresholds.window_s
        versions = {}
        for name, v in self.versions.items():
            versions[name] = {"ref": v.ref, "app": v.app, "deployment": v.deployment,
                              "weight": self.weights.get(name, 0.0),
                              "kpis": KPIWindow.summarize([o for o in v.kpi.window(0, now, window) if not o.shadow],
                                                          len(v.kpi.in_flight)),
                              "totals": dict(v.kpi.totals)}
        c = self.canary
        serve_cfg = {**to_dict(self.serve_cfg), "app_name": self.app_name}
        api_key_set = serve_cfg["http"].get("api_key") is not None
        # the API key itself is never shown: only whether one guards the app
        serve_cfg["http"] = {**serve_cfg["http"], **_http_address(), "api_key": None}
        return {"app": self.app_name, "region": self.scope or None, "resource": self.resource,
                "stable": self.stable, "previous": self.previous,
                "weights": dict(self.weights), "alias": self.cfg.alias, "versions": versions,
                "canary": self._canary_status(c) if c else None,
                "running": bool(c and c.running), "history": self.history[-10:],
                "events": list(self.events)[-20:],
                "serve": serve_cfg, "api_key_set": api_key_set,
                "canary_defaults": {"plan": to_dict(self.cfg.plan), "thresholds": to_dict(self.cfg.thresholds)}}

    async def add_version(self, name: str, ref: str | None, app: str, deployment: str) -> dict[str, Any]:
        """Register a version deployed in a side application (at 0% until a plan or weights route to it)."""
        if name not in self.versions:
            self.versions[name] = _Version(name=name, ref=ref, app=app, deployment=deployment)
            self._changed()
            self._event("version_added", version=name, ref=ref)
            await self._settle()
        return {"status": await self.status()}

    def find_version(self, ref_or_name: str) -> str | None:
        if ref_or_name in self.versions:
            return ref_or_name
        for name, v in self.versions.items():
            if v.ref == ref_or_name and name == v.ref:  # a twin under another name (e.g. a test fault) is not it
                return name
        return None

    async def lookup(self, ref_or_name: str) -> str | None:
        return self.find_version(ref_or_name)

    async def start(self, candidate: str, *, plan: dict[str, Any] | None = None,
                    thresholds: dict[str, Any] | None = None, force: bool = False,
                    wait: bool = True) -> dict[str, Any]:
        """Begin a rollout of a deployed version (name or ref) under ``plan``; with ``wait``, return once the
        ingress replicas route on its first step.

        Raises:
            CanaryError: one is running already, or the candidate is the stable version.
            ArtifactNotFoundError: the app serves no such version.
            ConfigError: a bad plan or thresholds.
            ValidationFailedError: the candidate would fail Registry.promote's gate (unless ``force``).
        """
        async with self._lock:
            if self.canary is not None and self.canary.running:
                raise CanaryError(f"a canary of {self.canary.candidate} is already running in app "
                                  f"{self.app_name!r} ({self._canary_status(self.canary)['phase']}); "
                                  "promote or abort it first")
            name = self.find_version(candidate)
            if name is None:
                raise ArtifactNotFoundError(f"{candidate!r} is not a version of app {self.app_name!r} "
                                            f"(versions: {', '.join(self.versions)})")
            if name == self.stable:
                raise CanaryError(f"{name} is already the stable version")
            plan_cfg = load_config(CanaryPlan, plan if plan is not None else to_dict(self.cfg.plan))
            th_cfg = load_config(CanaryThresholds, thresholds if thresholds is not None
                                 else to_dict(self.cfg.thresholds))
            ref = self.versions[name].ref
            if ref and plan_cfg.auto_promote and plan_cfg.steps and not force:
                ok, why = await asyncio.to_thread(self.registry.check_gate, ref, self.cfg.alias)
                if not ok:
                    raise ValidationFailedError(refusal(ref, why))
            self.canary = self._new_controller(name, plan_cfg, th_cfg, force)
            self.transitions["started"] += 1
            self._changed()
            self._event("canary_started", candidate=name, plan=to_dict(plan_cfg), forced=force)
        if wait:
            await self._settle()
        return {"status": await self.status()}

    async def promote(self, *, force: bool = False, reason: str | None = None) -> dict[str, Any]:
        """Promote the running (or refused) candidate now: 100% of traffic and the registry alias."""
        async with self._lock:
            c = self.canary
            if c is None or c.state not in ("running", "promotion_refused", "shadow_done"):
                raise CanaryError(f"no canary to promote in app {self.app_name!r}"
                                  + (f" (the last one ended: {c.state})" if c else ""))
            result = await self._promote(c, force=force, reason=reason or "promoted by hand")
        await self._settle()
        return {**result, "status": await self.status()}

    async def abort_canary(self, *, reason: str | None = None) -> dict[str, Any]:
        """Stop the running canary: the candidate's share drops to 0 now; requests in flight finish."""
        async with self._lock:
            c = self.canary
            if c is None or not c.running:
                raise CanaryError(f"no canary is running in app {self.app_name!r}")
            c.end("aborted", reason or "aborted by hand")
        await self._settle()
        return {"status": await self.status()}

    async def rollback(self, *, reason: str | None = None) -> dict[str, Any]:
        """Route everything back to the previous stable version and roll the registry alias back.

        During a canary this is an abort. Replicas keep running; in-flight requests finish where they are.
        """
        async with self._lock:
            c = self.canary
            if c is not None and c.running:
                c.end("aborted", reason or "rolled back by hand")
                event = None
            else:
                event = await self._roll_back(reason)
        await self._settle()
        return {"status": await self.status(), "registry_event": event}

    async def _roll_back(self, reason: str | None) -> dict[str, Any] | None:
        """Route back to the previous stable version and roll the registry alias back (under the lock)."""
        if self.previous is None or self.previous not in self.versions:
            raise CanaryError(f"app {self.app_name!r} has no previous version to roll back to "
                              f"(stable: {self.stable})")
        current, target = self.stable, self.previous
        self.weights = {target: 100.0}  # the routing change: adopted by every replica before this returns
        self.stable, self.previous = target, current
        self._changed()
        self.transitions["rollback"] += 1
        self._event("rollback", to=target, frm=current, reason=reason)
        event = None
        ref_now, ref_back = self.versions[current].ref, self.versions[target].ref
        if ref_now and ref_back:
            now_ref = ArtifactRef.concrete(ref_now)
            try:
                held = (await asyncio.to_thread(self.registry.aliases, now_ref.name)).get(self.cfg.alias)
                if held == now_ref.version:
                    event = await asyncio.to_thread(self.registry.rollback, now_ref.name, self.cfg.alias,
                                                    reason=reason or f"rollback of app {self.app_name}")
            except LLMStackError as exc:
                event = {"error": str(exc)}
        return event

    async def set_weights(self, weights: dict[str, float]) -> dict[str, Any]:
        """A static split between deployed versions (not while a canary runs)."""
        async with self._lock:
            if self.canary is not None and self.canary.running:
                raise CanaryError("a canary is running: its plan owns the weights; abort it first")
            problems = check_weights({k: float(v) for k, v in weights.items()}, known=list(self.versions))
            if not weights:
                problems.append("weights: empty")
            if problems:
                raise ConfigError(problems)
            self.weights = {k: float(v) for k, v in weights.items() if float(v) > 0}
            self._changed()
            self._event("weights", weights=dict(self.weights))
        await self._settle()
        return {"status": await self.status()}

    async def _settle(self) -> None:
        if not await self.settled(self.scope, self.epoch):
            logger.warning("canary %r: not every ingress replica confirmed epoch %d in time", self.scope, self.epoch)


def _http_address() -> dict[str, Any]:
    """Host and port Serve's HTTP proxy really listens on (the config's may be overridden by http_options)."""
    import ray

    from llmstack._ray import serve_http_address

    if not ray.is_initialized():  # outside a cluster (unit tests): asking would start a local Ray
        return {}
    http = serve_http_address()
    return {"host": http[0], "port": http[1]} if http else {}
