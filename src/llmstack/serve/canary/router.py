"""The canary router deployment: routes each request to one version by weight (sticky by session key),
mirrors shadow traffic, measures every version's KPIs, and owns the rollout controller.

Routing is state in the router's memory: a breach, an abort or a rollback changes the weights in the
same event loop that routes requests, so it takes effect for the next request, and no replica restarts.
The router has a single replica so that the plan has one owner.

Kept as one module (~520 lines): routing, shadow traffic and the admin methods all act on the
router's in-memory state in one event loop; the rollout logic itself is in :mod:`.controller`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from ray import serve

from llmstack.config import ServeConfig, load_config, to_dict
from llmstack.errors import (ArtifactNotFoundError, ConfigError, LLMStackError, RequestError,
                             ValidationFailedError)
from llmstack.registry import ArtifactRef
from llmstack.serve.canary.config import ROUTER, CanaryConfig, CanaryError, CanaryPlan, CanaryThresholds, check_weights
from llmstack.serve.canary.controller import PROMOTE, RolloutController
from llmstack.serve.canary.kpis import KPIWindow, Observation, is_degenerate
from llmstack.serve.canary.metrics import RouterMetrics
from llmstack.serve.deployments.client import ServeEngineClient
from llmstack.serve.protocol import GenerationRequest, GenerationResult, ModelCard

logger = logging.getLogger("ray.serve")


@dataclass
class _Version:
    name: str
    ref: str | None
    client: ServeEngineClient
    app: str
    deployment: str
    kpi: KPIWindow = field(default_factory=KPIWindow)
    cards: list[ModelCard] | None = None


class CanaryRouter:
    """Routes each request to one version by weight (sticky by session key) and runs the rollout controller."""

    async def __init__(self, spec: dict[str, Any], handles: dict[str, Any]) -> None:
        from llmstack.registry import Registry

        self.spec = spec
        self.serve_cfg = load_config(ServeConfig, spec["serve"])
        cfg = load_config(CanaryConfig, spec["canary"])
        self.cfg = cfg
        self.registry = Registry(self.serve_cfg.registry)
        self.app_name = _own_app_name(self.serve_cfg.app_name)
        self.versions: dict[str, _Version] = {}
        for v in spec["versions"]:
            self.versions[v["name"]] = _Version(
                name=v["name"], ref=v["ref"], app=self.app_name, deployment=v["deployment"],
                client=ServeEngineClient(handles[v["name"]], retry_after_s=self.serve_cfg.retry_after_s))
        self.stable = spec["stable"]
        self.previous: str | None = None
        self.weights: dict[str, float] = dict(spec["weights"])
        self.canary: RolloutController | None = None
        self.history: list[dict[str, Any]] = []  # canaries that ended, newest last
        self.events: deque[dict[str, Any]] = deque(maxlen=200)
        self._shadow_tasks: set[asyncio.Task] = set()
        self._lock = asyncio.Lock()
        self._metrics = RouterMetrics()
        self._control = asyncio.get_running_loop().create_task(self._control_loop())
        if cfg.start and spec.get("candidate"):
            try:
                await self.start(spec["candidate"], force=cfg.force)
            except LLMStackError as exc:  # e.g. the candidate fails the gate: serve the stable version, say why
                self._event("start_refused", error=type(exc).__name__, message=str(exc))
                logger.warning("canary not started: %s", exc)

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

    async def generate(self, request: GenerationRequest, key: str | None = None) -> tuple[str, Any]:
        """Route one request; returns ``(version name, GenerationResult)``; raises what the version raised."""
        name = self.pick(key)
        version = self.versions[name]
        self._count_routed(name)
        reference = self._mirror(request) if self._shadow_on(name) else None
        try:
            result = await self._call(version, request)
        except BaseException as exc:
            if reference is not None and not reference.done():
                reference.set_result(None)
            if isinstance(exc, LLMStackError):
                exc.version = name  # type: ignore[attr-defined]  # who answered: the ingress's response header
            raise
        if reference is not None and not reference.done():
            reference.set_result(result)  # the stable answer the mirrored one is compared with
        return name, result

    async def _call(self, version: _Version, request: GenerationRequest, *, shadow: bool = False) -> Any:
        token = version.kpi.begin()
        start = time.monotonic()
        obs: Observation | None = None
        try:
            req = await self._normalize(request, version)
            result = await version.client.generate(req)
            text_bad = any(is_degenerate(c.text, c.token_ids) for c in result.choices)
            obs = Observation(time.monotonic(), time.monotonic() - start, result.timing.ttft_s if result.timing else None,
                       False, text_bad, shadow)
            return result
        except asyncio.CancelledError:
            raise
        except LLMStackError as exc:
            obs = Observation(time.monotonic(), time.monotonic() - start, None, exc.status_code >= 500, False, shadow)
            raise
        except Exception as exc:  # the version's replica raised: a 500 for this request, evidence for the KPIs
            obs = Observation(time.monotonic(), time.monotonic() - start, None, True, False, shadow)
            raise _version_failed(version.name, exc) from None
        finally:
            version.kpi.end(token, obs)
            if obs is not None:
                self._observe(version.name, obs)

    async def stream(self, request: GenerationRequest, key: str | None = None) -> AsyncIterator[Any]:
        """Route one streaming request: yields ``{"version": name}`` first, then chunks; raises what the version raised."""
        name = self.pick(key)
        version = self.versions[name]
        self._count_routed(name)
        if self._shadow_on(name):
            self._mirror(request).set_result(None)  # streamed answers are not compared, only measured
        yield {"version": name}
        token = version.kpi.begin()
        start = time.monotonic()
        ttft = None
        texts: dict[int, list[str]] = {}
        ids: dict[int, list[int]] = {}
        obs: Observation | None = None
        try:
            req = await self._normalize(request, version)
            async for chunk in version.client.stream(req):
                for d in chunk.deltas:
                    texts.setdefault(d.index, []).append(d.text)
                    ids.setdefault(d.index, []).extend(d.token_ids)
                    if ttft is None and d.text:
                        ttft = time.monotonic() - start
                yield chunk
            bad = any(is_degenerate("".join(texts.get(i, [])), ids.get(i)) for i in (texts or {0: []}))
            obs = Observation(time.monotonic(), time.monotonic() - start, ttft, False, bad)
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except LLMStackError as exc:
            obs = Observation(time.monotonic(), time.monotonic() - start, None, exc.status_code >= 500, False)
            raise
        except Exception as exc:
            obs = Observation(time.monotonic(), time.monotonic() - start, None, True, False)
            raise _version_failed(name, exc) from None
        finally:
            version.kpi.end(token, obs)
            if obs is not None:
                self._observe(name, obs)

    def _count_routed(self, name: str) -> None:
        self._metrics.routed(name)
        if self.canary is not None:
            self.canary.routed(name)

    # ------------------------------------------------------------------ shadow mode

    def _shadow_on(self, routed: str) -> bool:
        return self.canary is not None and len(self._shadow_tasks) < 64 and self.canary.wants_shadow(routed)

    def _mirror(self, request: GenerationRequest) -> asyncio.Future:
        """Send a copy to the candidate in the background; its answer is measured and compared, never returned.

        Returns the future the caller resolves with the stable version's answer.
        """
        c = self.canary
        assert c is not None
        loop = asyncio.get_running_loop()
        reference: asyncio.Future = loop.create_future()
        copy = request.model_copy(update={"request_id": request.request_id + "-shadow"})

        async def run() -> None:
            try:
                result = await self._call(self.versions[c.candidate], copy, shadow=True)
            except Exception:  # measured by _call; a mirrored answer is never returned
                result = None
            try:
                stable = await asyncio.wait_for(asyncio.shield(reference), timeout=120)
            except asyncio.TimeoutError:
                return
            # Only deterministic requests (greedy or seeded) can be expected to agree.
            if request.sampling.deterministic and isinstance(result, GenerationResult) \
                    and isinstance(stable, GenerationResult):
                c.shadow_compared_with([x.text for x in result.choices] == [x.text for x in stable.choices])

        task = loop.create_task(run())
        self._shadow_tasks.add(task)
        task.add_done_callback(self._shadow_tasks.discard)
        return reference

    # ------------------------------------------------------------------ the controller's owner

    def _observe(self, name: str, obs: Observation) -> None:
        self._metrics.observe(name, obs)
        if self.canary is not None:
            self.canary.observe(name, obs)  # a breach rolls back right here, before the next request is routed

    def _new_controller(self, candidate: str, plan: CanaryPlan, thresholds: CanaryThresholds,
                        force: bool) -> RolloutController:
        kpis = {name: v.kpi for name, v in self.versions.items()}

        def on_share(share: float) -> None:
            weights = {candidate: share, self.stable: 100.0 - share}
            self.weights = {k: v for k, v in weights.items() if v > 0} or {self.stable: 100.0}
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
        self._metrics.ended(state)
        self._event(state, candidate=c.candidate, reason=reason)
        logger.warning("canary %s: %s (%s)", c.candidate, state, reason)
        summary = self._canary_status(c)
        self.history.append(summary)
        ref = self.versions[c.candidate].ref
        if ref:  # record the outcome on the candidate's immutable version
            task = asyncio.get_running_loop().create_task(self._annotate(ref, summary))
            self._shadow_tasks.add(task)
            task.add_done_callback(self._shadow_tasks.discard)

    async def _annotate(self, ref: str, summary: dict[str, Any]) -> None:
        try:
            await asyncio.to_thread(self.registry.annotate, ref, "canary", json.loads(json.dumps(summary, default=str)))
        except Exception as exc:  # recording must never break routing
            logger.warning("could not annotate %s: %s", ref, exc)

    async def _control_loop(self) -> None:
        while True:
            await asyncio.sleep(0.1)
            c = self.canary
            if c is None or not c.running:
                continue
            try:
                if c.tick() == PROMOTE:
                    await self._promote(c, force=c.force, reason=f"canary plan {c.plan.steps} clean", auto=True)
            except Exception:  # the controller must survive anything
                logger.exception("canary controller step failed")

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
        c.end("promoted", reason + (" (forced)" if event and event.get("forced") else ""))
        self.history[-1]["registry_event"] = event
        return {"status": await self.status(), "registry_event": event}

    # ------------------------------------------------------------------ admin (handle methods)

    def _event(self, kind: str, **data: Any) -> None:
        self.events.append({"at": time.time(), "event": kind, **data})

    def _canary_status(self, c: RolloutController) -> dict[str, Any]:
        return c.status(candidate_ref=self.versions[c.candidate].ref)

    async def status(self) -> dict[str, Any]:
        """Versions, weights, per-version KPIs (last window), and the canary in progress or last ended."""
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
        serve_cfg = {**self.spec["serve"], "app_name": self.app_name, **_http_address()}
        api_key_set = serve_cfg.get("api_key") is not None
        return {"app": self.app_name, "stable": self.stable, "previous": self.previous,
                "weights": dict(self.weights), "alias": self.cfg.alias, "versions": versions,
                "canary": self._canary_status(c) if c else None,
                "running": bool(c and c.running), "history": self.history[-10:],
                "events": list(self.events)[-20:],
                # the API key itself is never shown: only whether one guards the app
                "serve": {**serve_cfg, "api_key": None}, "api_key_set": api_key_set,
                "canary_defaults": {"plan": to_dict(self.cfg.plan), "thresholds": to_dict(self.cfg.thresholds)}}

    async def add_version(self, name: str, ref: str | None, app: str, deployment: str) -> dict[str, Any]:
        """Register a version deployed in a side application (at 0% until a plan or weights route to it)."""
        if name not in self.versions:
            handle = serve.get_deployment_handle(deployment, app_name=app)
            self.versions[name] = _Version(name=name, ref=ref, app=app, deployment=deployment,
                                           client=ServeEngineClient(handle,
                                                                    retry_after_s=self.serve_cfg.retry_after_s))
            self._event("version_added", version=name, ref=ref)
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
                    thresholds: dict[str, Any] | None = None, force: bool = False) -> dict[str, Any]:
        """Begin a rollout of a deployed version (name or ref) under ``plan``.

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
            self._metrics.started()
            self._event("canary_started", candidate=name, plan=to_dict(plan_cfg), forced=force)
            return {"status": await self.status()}

    async def promote(self, *, force: bool = False, reason: str | None = None) -> dict[str, Any]:
        """Promote the running (or refused) candidate now: 100% of traffic and the registry alias."""
        async with self._lock:
            c = self.canary
            if c is None or c.state not in ("running", "promotion_refused", "shadow_done"):
                raise CanaryError(f"no canary to promote in app {self.app_name!r}"
                                  + (f" (the last one ended: {c.state})" if c else ""))
            return await self._promote(c, force=force, reason=reason or "promoted by hand")

    async def abort(self, request_id: str) -> bool:
        """Engine protocol: cancel a request on whichever version holds it."""
        results = await asyncio.gather(*(v.client.abort(request_id) for v in self.versions.values()),
                                       return_exceptions=True)
        return any(r is True for r in results)

    async def abort_canary(self, *, reason: str | None = None) -> dict[str, Any]:
        """Stop the running canary: the candidate's share drops to 0 now; requests in flight finish."""
        async with self._lock:
            c = self.canary
            if c is None or not c.running:
                raise CanaryError(f"no canary is running in app {self.app_name!r}")
            c.end("aborted", reason or "aborted by hand")
            return {"status": await self.status()}

    async def rollback(self, *, reason: str | None = None) -> dict[str, Any]:
        """Route everything back to the previous stable version and roll the registry alias back.

        During a canary this is an abort. Replicas keep running; in-flight requests finish where they are.
        """
        async with self._lock:
            c = self.canary
            if c is not None and c.running:
                c.end("aborted", reason or "rolled back by hand")
                return {"status": await self.status(), "registry_event": None}
            if self.previous is None or self.previous not in self.versions:
                raise CanaryError(f"app {self.app_name!r} has no previous version to roll back to "
                                  f"(stable: {self.stable})")
            current, target = self.stable, self.previous
            self.weights = {target: 100.0}  # the routing change: effective for the next request
            self.stable, self.previous = target, current
            self._metrics.ended("rollback")
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
            return {"status": await self.status(), "registry_event": event}

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
            self._event("weights", weights=dict(self.weights))
            return {"status": await self.status()}

    async def models(self) -> list[ModelCard]:
        stable = self.versions[self.stable]
        if stable.cards is None:
            stable.cards = await stable.client.models()
        return stable.cards

    async def backend_health(self) -> None:
        """Health of what serves traffic (every version with a weight); raises when one is down."""
        await asyncio.gather(*(self.versions[n].client.check_health() for n in self.weights))

    async def metrics_text(self) -> str:
        return self._metrics.render(self)


def _own_app_name(configured: str) -> str:
    """The Serve application this replica belongs to (``serve run`` names it in the YAML, not in the args)."""
    try:
        return serve.get_replica_context().app_name
    except Exception:  # constructed outside a replica (unit tests)
        return configured


def _http_address() -> dict[str, Any]:
    """Host and port Serve's HTTP proxy really listens on (the config's may be overridden by http_options)."""
    from llmstack._ray import serve_http_address

    http = serve_http_address()
    return {"host": http[0], "port": http[1]} if http else {}


def refusal(ref: str, why: str) -> str:
    return (f"refusing to start a canary of {ref}: {why}; a clean plan could not promote it. "
            "Validate it first, or pass force=True (the promotion is then recorded as forced)")


def _version_failed(name: str, exc: BaseException) -> RequestError:
    """A version's replica raised something that is not an llmstack error: a 500 naming the version and type."""
    return RequestError(f"version {name} failed: {type(exc).__name__}", status_code=500, type="server_error")


RouterDeployment = serve.deployment(name=ROUTER, num_replicas=1, max_ongoing_requests=100_000,
                                    ray_actor_options={"num_cpus": 0.0}, health_check_period_s=10)(CanaryRouter)
