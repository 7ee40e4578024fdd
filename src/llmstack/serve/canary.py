"""Canary releases on Ray Serve: a router in front of model versions, live KPIs, progressive rollout, rollback.

Topology (one Serve application, plus one side application per version started at run time)::

    HTTP ─▶ CanaryIngress (the OpenAI API of ``ingress.make_api`` + /canary admin routes, session keys)
               │  generate(request, key) / stream(request, key) over a DeploymentHandle
               ▼
            CanaryRouter ×1 (weights, sticky keys, per-version KPIs, the rollout controller, shadow mirror)
               │  the engine protocol (``ServeEngineClient``) per version
               ▼
            LLMServer "tiny-lm@v1" (stable)      LLMServer "tiny-lm@v2" (candidate)      ...

Routing is state in the router's memory: a breach, an abort or a rollback changes the weights in the
same event loop that routes requests, so it takes effect for the next request, and no replica restarts.
Requests already running on a version finish there. The router has a single replica so that the
plan has one owner; if it is restarted, it comes back with the configured weights (the stable version).

Driver-side functions (what ``llmstack canary start|status|promote|abort`` and ``llmstack rollback``
call on a running app): :func:`canary_start`, :func:`canary_status`, :func:`canary_promote`,
:func:`canary_abort`, :func:`rollback_app`, :func:`set_weights`. The same operations are HTTP routes
of the app: ``GET /canary``, ``POST /canary/{start,promote,abort,rollback,weights}``.

Example:
    >>> dep = deploy_canary({"stable": "tiny-lm@v1", "candidate": "tiny-lm@v2", "port": 8123})  # doctest: +SKIP
    >>> plan = {"steps": [5, 25, 50, 100], "hold_s": 30}
    >>> canary_start("tiny-lm@v2", app_name=dep.app_name, plan=plan)  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import hashlib
import json
import logging
import os
import random
import re
import time
from collections import Counter, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from ray import serve

from llmstack.config import ServeConfig, load_config, to_dict
from llmstack.errors import ArtifactNotFoundError, ConfigError, LLMStackError, ValidationFailedError
from llmstack.serve.ingress import ServeEngineClient, error_response, make_api
from llmstack.serve.protocol import (EngineError, ErrorInfo, GenerationChunk, GenerationRequest, GenerationResult,
                                     ModelCard)
from llmstack.serve.server import LLMServer

logger = logging.getLogger("ray.serve")

ROUTER = "CanaryRouter"
INGRESS = "CanaryIngress"
VERSION_HEADER = "x-llmstack-version"  # response header: the version that answered
FAULTS = ("raise", "garbage", "slow")


class CanaryError(LLMStackError):
    """A canary operation that conflicts with the app's state (one already running, nothing to promote, ...)."""


# --------------------------------------------------------------------------- configuration


@dataclass
class VersionSpec:
    """One model version served side by side with the others."""

    model: str  # registry ref (name, name@vN, name@alias) or local model directory
    name: str = ""  # version name used in weights and status; default: the resolved ref, e.g. tiny-lm@v2
    fault: str | None = None  # TEST/FAULT INJECTION ONLY: "raise" | "garbage" | "slow" (a deliberately broken version)
    fault_delay_s: float = 2.0  # TEST/FAULT INJECTION ONLY: extra seconds per request for fault "slow"

    def check(self) -> list[tuple[str, str]]:
        problems = []
        if self.fault is not None and self.fault not in FAULTS:
            problems.append(("fault", f"must be one of {', '.join(FAULTS)} (test-only fault injection), "
                                      f"got {self.fault!r}"))
        if self.fault_delay_s < 0:
            problems.append(("fault_delay_s", f"must be >= 0, got {self.fault_delay_s}"))
        return problems


@dataclass
class CanaryPlan:
    """How a candidate meets traffic: an optional shadow phase, then increasing shares, then promotion."""

    steps: list[float] = field(default_factory=lambda: [5.0, 25.0, 50.0, 100.0])  # candidate % per step, increasing
    hold_s: float = 60.0  # seconds at each step before it may advance
    min_requests: int = 10  # candidate requests needed in a step before it may advance (no traffic: no evidence)
    shadow_share: float = 0.0  # share (0..1) of stable requests mirrored to the candidate in the shadow phase
    shadow_hold_s: float = 0.0  # seconds of shadow phase before the first step (0: no shadow phase)
    auto_promote: bool = True  # after the last step at 100%: move the registry alias (Registry.promote)

    def check(self) -> list[tuple[str, str]]:
        problems = []
        if any(not 0 < s <= 100 for s in self.steps):
            problems.append(("steps", f"each step must be in (0, 100], got {self.steps}"))
        elif any(b <= a for a, b in zip(self.steps, self.steps[1:])):
            problems.append(("steps", f"must increase strictly, got {self.steps}"))
        if not self.steps and self.shadow_hold_s <= 0:
            problems.append(("steps", "an empty plan needs a shadow phase (shadow_hold_s > 0)"))
        if self.hold_s < 0:
            problems.append(("hold_s", f"must be >= 0, got {self.hold_s}"))
        if self.min_requests < 0:
            problems.append(("min_requests", f"must be >= 0, got {self.min_requests}"))
        if not 0 <= self.shadow_share <= 1:
            problems.append(("shadow_share", f"must be in [0, 1], got {self.shadow_share}"))
        if self.shadow_hold_s < 0:
            problems.append(("shadow_hold_s", f"must be >= 0, got {self.shadow_hold_s}"))
        if self.shadow_hold_s > 0 and self.shadow_share <= 0:
            problems.append(("shadow_share", "must be > 0 when shadow_hold_s > 0"))
        return problems


@dataclass
class CanaryThresholds:
    """When the candidate's KPIs count as a breach, compared with the stable version's over the same window."""

    window_s: float = 60.0  # KPIs over the last window_s seconds (and only since the canary started)
    max_error_rate_delta: float = 0.05  # candidate error rate (5xx) may exceed stable's by at most this
    min_errors: int = 2  # errors needed before the error check can breach
    max_bad_output_delta: float = 0.2  # same for empty or degenerate outputs
    min_bad_outputs: int = 2
    max_latency_ratio: float = 2.0  # candidate latency above stable p95 x this (and + latency_floor_s) is slow
    max_ttft_ratio: float = 2.0  # same for time to first token
    latency_floor_s: float = 0.5  # absolute margin: smaller slow-downs are never a breach
    min_slow: int = 2  # slow requests (finished, or still running past the limit) needed to breach
    min_stable_samples: int = 5  # stable samples needed for a relative latency limit (else floor x 4)

    def check(self) -> list[tuple[str, str]]:
        problems = []
        for name in ("window_s", "max_latency_ratio", "max_ttft_ratio", "latency_floor_s"):
            if not getattr(self, name) > 0:
                problems.append((name, f"must be > 0, got {getattr(self, name)}"))
        for name in ("max_error_rate_delta", "max_bad_output_delta"):
            if not 0 <= getattr(self, name) <= 1:
                problems.append((name, f"must be in [0, 1], got {getattr(self, name)}"))
        for name in ("min_errors", "min_bad_outputs", "min_slow", "min_stable_samples"):
            if getattr(self, name) < 1:
                problems.append((name, f"must be >= 1, got {getattr(self, name)}"))
        return problems


@dataclass
class CanaryConfig:
    """The canary app: versions, weights, plan and thresholds. ServeConfig fields sit beside these (flat)."""

    stable: str = "tiny-lm@production"  # the stable version's model (registry ref or directory)
    candidate: str | None = None  # the candidate's model; deployed next to the stable one
    versions: list[VersionSpec] = field(default_factory=list)  # further versions (names unique)
    weights: dict[str, float] = field(default_factory=dict)  # version name (or "stable"/"candidate") -> %, sum 100
    start: bool = False  # begin the plan for `candidate` as soon as the app is up
    plan: CanaryPlan = field(default_factory=CanaryPlan)
    thresholds: CanaryThresholds = field(default_factory=CanaryThresholds)
    alias: str = "production"  # registry alias a clean plan promotes the candidate to
    force: bool = False  # start/promote without a passing validation report (recorded as a forced promotion)
    session_header: str = "x-session-id"  # request header pinning a caller to a version (else the `user` field)
    version_replicas: int = 1  # replicas per version (autoscaling settings apply to the stable version's app only)


def _split_args(args: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    canary_keys = {f.name for f in dataclasses.fields(CanaryConfig)}
    canary = {k: v for k, v in args.items() if k in canary_keys}
    served = {k: v for k, v in args.items() if k not in canary_keys}
    if "model" in served:
        raise ConfigError("model: a canary app takes `stable` and `candidate` (and `versions`), not `model`")
    return canary, served


def load_canary_config(args: CanaryConfig | dict[str, Any] | str | None) -> tuple[CanaryConfig, ServeConfig]:
    """Parse flat canary args (canary fields plus ServeConfig fields); every problem reported at once.

    Raises:
        ConfigError: bad fields, unknown keys, or weights that do not sum to 100.
    """
    import yaml

    if isinstance(args, str):
        try:
            with open(args, encoding="utf-8") as fh:
                args = yaml.safe_load(fh) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {args}") from None
    data = dict(args or {})
    canary_data, serve_data = _split_args(data)
    problems: list[str] = []
    cfg = serve_cfg = None
    try:
        cfg = load_config(CanaryConfig, canary_data)
    except ConfigError as exc:
        problems += exc.problems
    try:
        serve_cfg = load_config(ServeConfig, serve_data)
    except ConfigError as exc:
        problems += exc.problems
    if cfg is not None:
        problems += check_weights(cfg.weights, known=None)
    if problems:
        raise ConfigError(problems)
    return cfg, serve_cfg  # type: ignore[return-value]


def check_weights(weights: dict[str, float], *, known: list[str] | None) -> list[str]:
    """Problems with a traffic split: unknown versions, negative shares, a total other than 100."""
    if not weights:
        return []
    problems = []
    for name, value in weights.items():
        if known is not None and name not in known:
            problems.append(f"weights.{name}: unknown version (known: {', '.join(known)})")
        if value < 0:
            problems.append(f"weights.{name}: must be >= 0, got {value}")
    total = sum(weights.values())
    if abs(total - 100.0) > 1e-6:
        split = ", ".join(f"{k}={v:g}" for k, v in weights.items())
        problems.append(f"weights: must sum to 100, got {total:g} ({split})")
    return problems


@dataclass
class ResolvedVersion:
    name: str
    ref: str | None  # concrete registry ref (name@vN), None for a local directory
    serve: dict[str, Any]  # the ServeConfig of its LLMServer deployment
    fault: str | None = None
    fault_delay_s: float = 0.0
    app: str = ""  # Serve application holding its deployment
    deployment: str = ""


def _deployment_name(version: str) -> str:
    return "LLMServer-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", version)


def resolve_version(spec: VersionSpec, serve_cfg: ServeConfig, *, taken: set[str], role: str) -> ResolvedVersion:
    """Pin ``spec.model`` to a concrete registry version (or keep the directory) and name the version.

    Raises:
        ArtifactNotFoundError: the model is not in the registry (names the role: stable / candidate).
    """
    from llmstack.serve.app import resolve_config

    try:
        pinned = resolve_config({**to_dict(serve_cfg), "model": spec.model})
    except ArtifactNotFoundError as exc:
        raise ArtifactNotFoundError(f"{role} {spec.model!r}: {exc}") from None
    ref = pinned.model if not os.path.isdir(os.path.expanduser(pinned.model)) else None
    name = spec.name or (ref or os.path.basename(os.path.normpath(pinned.model)))
    base, i = name, 2
    while name in taken:  # the same ref twice (e.g. a fault-injection twin): keep names unique
        name = f"{base}#{i}"
        i += 1
    taken.add(name)
    return ResolvedVersion(name=name, ref=ref, serve=to_dict(pinned), fault=spec.fault,
                           fault_delay_s=spec.fault_delay_s, deployment=_deployment_name(name))


def resolve_canary(args: CanaryConfig | dict[str, Any] | str | None) -> dict[str, Any]:
    """Parse and resolve a canary config into plain data for the router: versions, weights, plan.

    Raises:
        ConfigError: bad fields; weights not summing to 100 or naming unknown versions.
        ArtifactNotFoundError: the stable or candidate model is not in the registry.
    """
    cfg, serve_cfg = load_canary_config(args if not isinstance(args, CanaryConfig) else to_dict(args))
    from llmstack.registry import Registry

    registry = Registry(serve_cfg.registry) if serve_cfg.registry else Registry()
    serve_cfg = dataclasses.replace(serve_cfg, registry=registry.url)
    taken: set[str] = set()
    stable = resolve_version(VersionSpec(model=cfg.stable), serve_cfg, taken=taken, role="stable")
    versions = [stable]
    candidate = None
    if cfg.candidate:
        candidate = resolve_version(VersionSpec(model=cfg.candidate), serve_cfg, taken=taken, role="candidate")
        versions.append(candidate)
    for i, spec in enumerate(cfg.versions):
        versions.append(resolve_version(spec, serve_cfg, taken=taken, role=f"versions[{i}]"))
    names = [v.name for v in versions]
    roles = {"stable": stable.name, **({"candidate": candidate.name} if candidate else {})}
    weights = {roles.get(k, k): float(v) for k, v in cfg.weights.items()} or {stable.name: 100.0}
    problems = check_weights(weights, known=names)
    if cfg.start and candidate is None:
        problems.append("start: needs a `candidate`")
    if problems:
        raise ConfigError(problems)
    return {"serve": to_dict(serve_cfg), "canary": to_dict(cfg), "stable": stable.name,
            "candidate": candidate.name if candidate else None, "weights": weights,
            "versions": [dataclasses.asdict(v) for v in versions]}


# --------------------------------------------------------------------------- output sanity and KPIs


def is_degenerate(text: str, token_ids: list[int] | None = None) -> bool:
    """An empty or degenerate output: blank, one token repeated, or a run of one or two characters.

    Example:
        >>> is_degenerate(""), is_degenerate("!!!!!!!!!!!!!!!!"), is_degenerate("def add(a, b): return a + b")
        (True, True, False)
    """
    if not text.strip():
        return True
    ids = list(token_ids or [])
    if len(ids) >= 8 and Counter(ids).most_common(1)[0][1] / len(ids) >= 0.75:
        return True
    return len(text) >= 12 and len(set(text.replace(" ", ""))) <= 2


@dataclass
class _Obs:
    t: float  # when it finished
    latency: float
    ttft: float | None
    error: bool
    bad: bool
    shadow: bool = False


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


class _KPIs:
    """Live per-version KPIs: a time window of observations, requests in flight, and totals."""

    def __init__(self) -> None:
        self.obs: deque[_Obs] = deque()
        self.in_flight: dict[int, float] = {}  # token -> start time
        self.totals = Counter()
        self._next = 0

    def begin(self) -> int:
        self._next += 1
        self.in_flight[self._next] = time.monotonic()
        return self._next

    def end(self, token: int, obs: _Obs | None) -> None:
        self.in_flight.pop(token, None)
        if obs is None:  # cancelled by the client: not evidence either way
            self.totals["cancelled"] += 1
            return
        self.obs.append(obs)
        kind = "shadow_" if obs.shadow else ""
        self.totals[kind + "requests"] += 1
        self.totals[kind + "errors"] += int(obs.error)
        self.totals[kind + "bad_outputs"] += int(obs.bad)

    def window(self, since: float, now: float, window_s: float) -> list[_Obs]:
        horizon = now - 600.0
        while self.obs and self.obs[0].t < horizon:
            self.obs.popleft()
        start = max(since, now - window_s)
        return [o for o in self.obs if o.t >= start]

    @staticmethod
    def summarize(obs: list[_Obs], in_flight: int = 0) -> dict[str, Any]:
        n = len(obs)
        lat = [o.latency for o in obs if not o.error]
        ttft = [o.ttft for o in obs if o.ttft is not None and not o.error]
        errors = sum(o.error for o in obs)
        bad = sum(o.bad for o in obs)
        return {"requests": n, "errors": errors, "error_rate": errors / n if n else 0.0,
                "bad_outputs": bad, "bad_output_rate": bad / n if n else 0.0,
                "p50_s": _pct(lat, 0.5), "p95_s": _pct(lat, 0.95), "ttft_p50_s": _pct(ttft, 0.5),
                "ttft_p95_s": _pct(ttft, 0.95), "in_flight": in_flight}


# --------------------------------------------------------------------------- test-only fault injection


_BaseServer: Any = LLMServer.func_or_class


class FaultInjectingLLMServer(_BaseServer):  # type: ignore[misc, valid-type]
    """TEST/FAULT INJECTION ONLY: an ``LLMServer`` that misbehaves on purpose, to exercise canary rollback.

    ``raise``: every generation raises; ``garbage``: outputs are replaced by one repeated token;
    ``slow``: every request waits ``delay_s`` first. Selected with ``VersionSpec.fault``.
    """

    def __init__(self, config: dict[str, Any], fault: str, delay_s: float = 2.0) -> None:
        super().__init__(config)
        self.fault = fault
        self.delay_s = delay_s

    async def set_fault(self, fault: str | None, delay_s: float | None = None) -> None:
        """TEST/FAULT INJECTION ONLY: switch the injected fault (None: behave) without a restart."""
        if fault is not None and fault not in FAULTS:
            raise ValueError(f"fault must be one of {FAULTS} or None, got {fault!r}")
        self.fault = fault
        if delay_s is not None:
            self.delay_s = delay_s

    async def _before(self) -> None:
        if self.fault == "slow":
            await asyncio.sleep(self.delay_s)
        elif self.fault == "raise":
            raise RuntimeError("injected fault (test only): this version raises on every request")

    async def generate(self, request: GenerationRequest) -> GenerationResult | ErrorInfo:
        await self._before()
        result = await super().generate(request)
        if self.fault == "garbage" and isinstance(result, GenerationResult):
            for choice in result.choices:
                n = max(8, len(choice.token_ids))
                choice.text, choice.token_ids = "\ufffd" * n, [0] * n
        return result

    async def stream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk | ErrorInfo]:
        await self._before()
        async for item in super().stream(request):
            if self.fault == "garbage" and isinstance(item, GenerationChunk):
                for delta in item.deltas:
                    delta.text, delta.token_ids = "\ufffd" * max(1, len(delta.token_ids)), [0] * len(delta.token_ids)
            yield item


FaultServer = serve.deployment(name="FaultInjectingLLMServer")(FaultInjectingLLMServer)


def version_deployment(version: ResolvedVersion, *, replicas: int = 1, name: str | None = None) -> Any:
    """The bound ``LLMServer`` (or, for a test-only ``fault``, ``FaultInjectingLLMServer``) of one version."""
    cfg = load_config(ServeConfig, version.serve)
    options = dict(name=name or version.deployment, num_replicas=replicas,
                   max_ongoing_requests=cfg.max_ongoing_requests, max_queued_requests=cfg.max_queued_requests,
                   ray_actor_options={"num_cpus": cfg.num_cpus}, health_check_period_s=10,
                   graceful_shutdown_timeout_s=5)
    if version.fault:
        return FaultServer.options(**options).bind(version.serve, version.fault, version.fault_delay_s)
    return LLMServer.options(**options).bind(version.serve)


# --------------------------------------------------------------------------- the router


@dataclass
class _Version:
    name: str
    ref: str | None
    client: ServeEngineClient
    app: str
    deployment: str
    fault: str | None = None
    kpi: _KPIs = field(default_factory=_KPIs)
    cards: list[ModelCard] | None = None


@dataclass
class _Canary:
    candidate: str
    stable: str
    plan: CanaryPlan
    thresholds: CanaryThresholds
    force: bool
    started_at: float  # monotonic
    started_wall: float
    step: int = -1  # -1: shadow phase; 0..: index into plan.steps
    step_started_at: float = 0.0
    step_requests: int = 0
    state: str = "running"  # running | rolled_back | aborted | promoted | promotion_refused | shadow_done
    first_bad_at: float | None = None  # first candidate observation that was bad (error, bad output, slow)
    breach_at: float | None = None  # when the thresholds were crossed
    zero_at: float | None = None  # when the candidate's weight became 0 (rollback/abort) — routing change
    reason: str | None = None
    breach: dict[str, Any] | None = None
    shadow_compared: int = 0
    shadow_agreed: int = 0
    routed_to_candidate: int = 0  # live requests routed to the candidate (not shadow)
    ended_wall: float | None = None


class CanaryRouter:
    """Routes each request to one version by weight (sticky by session key) and runs the rollout controller."""

    async def __init__(self, spec: dict[str, Any], handles: dict[str, Any]) -> None:
        from llmstack.registry import Registry

        self.spec = spec
        self.serve_cfg = load_config(ServeConfig, spec["serve"])
        cfg = load_config(CanaryConfig, spec["canary"])
        self.cfg = cfg
        self.registry = Registry(self.serve_cfg.registry)
        self.app_name = self.serve_cfg.app_name
        self.versions: dict[str, _Version] = {}
        for v in spec["versions"]:
            self.versions[v["name"]] = _Version(
                name=v["name"], ref=v["ref"], app=self.app_name, deployment=v["deployment"], fault=v["fault"],
                client=ServeEngineClient(handles[v["name"]], retry_after_s=self.serve_cfg.retry_after_s))
        self.stable = spec["stable"]
        self.previous: str | None = None
        self.weights: dict[str, float] = dict(spec["weights"])
        self.canary: _Canary | None = None
        self.history: list[dict[str, Any]] = []  # canaries that ended, newest last
        self.events: deque[dict[str, Any]] = deque(maxlen=200)
        self._shadow_tasks: set[asyncio.Task] = set()
        self._lock = asyncio.Lock()
        self._metrics = _RouterMetrics()
        self._control = asyncio.get_running_loop().create_task(self._control_loop())
        if cfg.start and spec.get("candidate"):
            result = await self.start(spec["candidate"], force=cfg.force)
            if not result["ok"]:
                self._event("start_refused", **result["error"])

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
        """Route one request; returns ``(version name, GenerationResult | ErrorInfo)``."""
        name = self.pick(key)
        version = self.versions[name]
        self._count_routed(name)
        reference = self._mirror(request) if self._shadow_on(name) else None
        result = await self._call(version, request)
        if reference is not None and not reference.done():
            reference.set_result(result)  # the stable answer the mirrored one is compared with
        return name, result

    async def _call(self, version: _Version, request: GenerationRequest, *, shadow: bool = False) -> Any:
        token = version.kpi.begin()
        start = time.monotonic()
        obs: _Obs | None = None
        try:
            req = await self._normalize(request, version)
            result = await version.client.generate(req)
            text_bad = any(is_degenerate(c.text, c.token_ids) for c in result.choices)
            obs = _Obs(time.monotonic(), time.monotonic() - start, result.timing.ttft_s if result.timing else None,
                       False, text_bad, shadow)
            return result
        except asyncio.CancelledError:
            raise
        except EngineError as exc:
            obs = _Obs(time.monotonic(), time.monotonic() - start, None, exc.status_code >= 500, False, shadow)
            return exc.to_info()
        except Exception as exc:  # the version's replica raised: a 500 for this request, evidence for the KPIs
            obs = _Obs(time.monotonic(), time.monotonic() - start, None, True, False, shadow)
            return ErrorInfo(message=f"version {version.name} failed: {type(exc).__name__}: {_first_line(exc)}",
                             status_code=500, type="server_error")
        finally:
            version.kpi.end(token, obs)
            if obs is not None:
                self._observe(version.name, obs)

    async def stream(self, request: GenerationRequest, key: str | None = None) -> AsyncIterator[Any]:
        """Route one streaming request: yields ``{"version": name}`` first, then chunks (or an ErrorInfo)."""
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
        obs: _Obs | None = None
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
            obs = _Obs(time.monotonic(), time.monotonic() - start, ttft, False, bad)
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except EngineError as exc:
            obs = _Obs(time.monotonic(), time.monotonic() - start, None, exc.status_code >= 500, False)
            yield exc.to_info()
        except Exception as exc:
            obs = _Obs(time.monotonic(), time.monotonic() - start, None, True, False)
            yield ErrorInfo(message=f"version {name} failed: {type(exc).__name__}: {_first_line(exc)}",
                            status_code=500, type="server_error")
        finally:
            version.kpi.end(token, obs)
            if obs is not None:
                self._observe(name, obs)

    def _count_routed(self, name: str) -> None:
        self._metrics.routed(name)
        c = self.canary
        if c is not None and c.state == "running" and name == c.candidate:
            c.routed_to_candidate += 1
            c.step_requests += 1

    # ------------------------------------------------------------------ shadow mode

    def _shadow_on(self, routed: str) -> bool:
        c = self.canary
        return (c is not None and c.state == "running" and c.step == -1 and routed == c.stable
                and c.plan.shadow_share > 0 and random.random() < c.plan.shadow_share
                and len(self._shadow_tasks) < 64)

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
            result = await self._call(self.versions[c.candidate], copy, shadow=True)
            try:
                stable = await asyncio.wait_for(asyncio.shield(reference), timeout=120)
            except asyncio.TimeoutError:
                return
            # Only deterministic requests (greedy or seeded) can be expected to agree.
            if request.sampling.deterministic and isinstance(result, GenerationResult) \
                    and isinstance(stable, GenerationResult):
                c.shadow_compared += 1
                c.shadow_agreed += int([x.text for x in result.choices] == [x.text for x in stable.choices])

        task = loop.create_task(run())
        self._shadow_tasks.add(task)
        task.add_done_callback(self._shadow_tasks.discard)
        return reference

    # ------------------------------------------------------------------ the controller

    def _observe(self, name: str, obs: _Obs) -> None:
        self._metrics.observe(name, obs)
        c = self.canary
        if c is None or c.state != "running" or name != c.candidate:
            return
        if c.first_bad_at is None:
            if obs.error or obs.bad:
                c.first_bad_at = obs.t
            else:
                limit = self._latency_limit(c)
                if obs.latency > limit:
                    c.first_bad_at = obs.t - obs.latency + limit
        self._evaluate(c)  # a breach rolls back right here, before the next request is routed

    def _latency_limit(self, c: _Canary, *, ttft: bool = False) -> float:
        th = c.thresholds
        now = time.monotonic()
        stable = self.versions[c.stable].kpi.window(c.started_at - th.window_s, now, th.window_s)
        samples = [o.ttft if ttft else o.latency for o in stable if not o.error and not o.shadow]
        samples = [s for s in samples if s is not None]
        ratio = th.max_ttft_ratio if ttft else th.max_latency_ratio
        if len(samples) < th.min_stable_samples:
            return th.latency_floor_s * 4
        p95 = _pct(samples, 0.95) or 0.0
        return max(p95 * ratio, p95 + th.latency_floor_s)

    def _evaluate(self, c: _Canary) -> None:
        th = c.thresholds
        now = time.monotonic()
        cand_v = self.versions[c.candidate]
        cand = cand_v.kpi.window(c.started_at, now, th.window_s)
        stable = [o for o in self.versions[c.stable].kpi.window(c.started_at, now, th.window_s) if not o.shadow]
        cs, ss = _KPIs.summarize(cand), _KPIs.summarize(stable)
        reason = None
        if cs["errors"] >= th.min_errors and cs["error_rate"] - ss["error_rate"] > th.max_error_rate_delta:
            reason = (f"error rate {cs['error_rate']:.2f} ({cs['errors']}/{cs['requests']}) vs stable "
                      f"{ss['error_rate']:.2f}")
        elif (cs["bad_outputs"] >= th.min_bad_outputs
              and cs["bad_output_rate"] - ss["bad_output_rate"] > th.max_bad_output_delta):
            reason = (f"empty/degenerate outputs {cs['bad_output_rate']:.2f} ({cs['bad_outputs']}/{cs['requests']}) "
                      f"vs stable {ss['bad_output_rate']:.2f}")
        else:
            limit = self._latency_limit(c)
            ages = [now - t0 for t0 in cand_v.kpi.in_flight.values()]
            lat = [o.latency for o in cand if not o.error] + ages
            slow = [x for x in lat if x > limit]
            if len(slow) >= th.min_slow and (_pct(lat, 0.95) or 0.0) > limit:
                if c.first_bad_at is None:
                    c.first_bad_at = now - max(slow) + limit
                reason = (f"latency: {len(slow)} of {len(lat)} requests over {limit:.2f} s "
                          f"(stable p95 {ss['p95_s'] or 0:.3f} s x{th.max_latency_ratio})")
            else:
                tlimit = self._latency_limit(c, ttft=True)
                ttfts = [o.ttft for o in cand if o.ttft is not None]
                tslow = [x for x in ttfts if x > tlimit]
                if len(tslow) >= th.min_slow and (_pct(ttfts, 0.95) or 0.0) > tlimit:
                    reason = f"time to first token: {len(tslow)} of {len(ttfts)} over {tlimit:.2f} s"
        if reason is not None:
            c.breach_at = now
            c.breach = {"candidate": cs, "stable": ss}
            self._end(c, "rolled_back", f"breach: {reason}")

    def _set_canary_share(self, c: _Canary, share: float) -> None:
        weights = {c.candidate: share, c.stable: 100.0 - share}
        self.weights = {k: v for k, v in weights.items() if v > 0} or {c.stable: 100.0}
        self._event("weights", weights=dict(self.weights))

    def _end(self, c: _Canary, state: str, reason: str) -> None:
        """Finish a canary; for anything but a promotion the candidate's weight drops to 0 at once."""
        if state != "promoted":
            self.weights = {c.stable: 100.0}
            c.zero_at = time.monotonic()
        c.state = state
        c.reason = reason
        c.ended_wall = time.time()
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
            if c is None or c.state != "running":
                continue
            try:
                self._evaluate(c)  # also catches requests stuck in flight (a far slower candidate)
                if c.state != "running":
                    continue
                await self._advance(c)
            except Exception:  # the controller must survive anything
                logger.exception("canary controller step failed")

    async def _advance(self, c: _Canary) -> None:
        now = time.monotonic()
        hold = c.plan.shadow_hold_s if c.step == -1 else c.plan.hold_s
        if now - c.step_started_at < hold:
            return
        if c.step >= 0 and c.step_requests < c.plan.min_requests:
            return  # not enough evidence at this share yet
        if c.step == -1 and c.shadow_compared == 0 and self.versions[c.candidate].kpi.totals["shadow_requests"] == 0 \
                and c.plan.min_requests > 0:
            return
        if c.step + 1 < len(c.plan.steps):
            c.step += 1
            c.step_started_at = now
            c.step_requests = 0
            self._set_canary_share(c, c.plan.steps[c.step])
            return
        if not c.plan.steps:
            self._end(c, "shadow_done", "shadow phase clean")
            return
        if c.plan.steps[-1] < 100 or not c.plan.auto_promote:
            return  # holds at the last step until promoted or aborted by hand
        await self._promote(c, force=c.force, reason=f"canary plan {c.plan.steps} clean", auto=True)

    async def _promote(self, c: _Canary, *, force: bool, reason: str, auto: bool = False) -> dict[str, Any]:
        cand = self.versions[c.candidate]
        event = None
        if cand.ref:
            try:
                held = (await asyncio.to_thread(self.registry.aliases, cand.ref.split("@")[0])).get(self.cfg.alias)
                if held != int(cand.ref.rsplit("@v", 1)[1]):
                    event = await asyncio.to_thread(self.registry.promote, cand.ref, self.cfg.alias, force=force,
                                                    reason=reason)
            except ValidationFailedError as exc:
                if auto and c.state == "running":
                    self._end(c, "promotion_refused", str(exc))
                return _fail("refused", str(exc))
            except LLMStackError as exc:
                if auto and c.state == "running":
                    self._end(c, "promotion_refused", str(exc))
                return _fail("registry", str(exc))
        self.previous = c.stable
        self.stable = c.candidate
        self.weights = {c.candidate: 100.0}
        self._end(c, "promoted", reason + (" (forced)" if event and event.get("forced") else ""))
        self.history[-1]["registry_event"] = event
        return {"ok": True, "status": await self.status(), "registry_event": event}

    # ------------------------------------------------------------------ admin (handle methods)

    def _event(self, kind: str, **data: Any) -> None:
        self.events.append({"at": time.time(), "event": kind, **data})

    def _canary_status(self, c: _Canary) -> dict[str, Any]:
        now = time.monotonic()
        th = c.thresholds
        cand = self.versions[c.candidate].kpi.window(c.started_at, now, th.window_s)
        stable = [o for o in self.versions[c.stable].kpi.window(c.started_at, now, th.window_s) if not o.shadow]
        return {
            "candidate": c.candidate, "candidate_ref": self.versions[c.candidate].ref, "stable": c.stable,
            "state": c.state, "phase": "shadow" if c.step == -1 else f"step {c.step + 1}/{len(c.plan.steps)}",
            "share": (c.plan.steps[c.step] if c.step >= 0 and c.state == "running" else 0.0),
            "step_requests": c.step_requests, "routed_to_candidate": c.routed_to_candidate,
            "reason": c.reason, "plan": to_dict(c.plan), "thresholds": to_dict(th), "forced": c.force,
            "started_at": c.started_wall, "ended_at": c.ended_wall,
            "first_bad_to_zero_s": (c.zero_at - c.first_bad_at) if c.zero_at and c.first_bad_at else None,
            "breach_to_zero_s": (c.zero_at - c.breach_at) if c.zero_at and c.breach_at else None,
            "kpis": {"candidate": _KPIs.summarize(cand), "stable": _KPIs.summarize(stable)},
            "shadow": {"compared": c.shadow_compared, "agreed": c.shadow_agreed},
        }

    async def status(self) -> dict[str, Any]:
        """Versions, weights, per-version KPIs (last window), and the canary in progress or last ended."""
        now = time.monotonic()
        window = self.cfg.thresholds.window_s
        versions = {}
        for name, v in self.versions.items():
            versions[name] = {"ref": v.ref, "app": v.app, "deployment": v.deployment, "fault": v.fault,
                              "weight": self.weights.get(name, 0.0),
                              "kpis": _KPIs.summarize([o for o in v.kpi.window(0, now, window) if not o.shadow],
                                                      len(v.kpi.in_flight)),
                              "totals": dict(v.kpi.totals)}
        c = self.canary
        return {"app": self.app_name, "stable": self.stable, "previous": self.previous,
                "weights": dict(self.weights), "alias": self.cfg.alias, "versions": versions,
                "canary": self._canary_status(c) if c else None,
                "running": bool(c and c.state == "running"), "history": self.history[-10:],
                "events": list(self.events)[-20:], "serve": {**self.spec["serve"], "api_key": None},
                "canary_defaults": {"plan": to_dict(self.cfg.plan), "thresholds": to_dict(self.cfg.thresholds)}}

    async def add_version(self, name: str, ref: str | None, app: str, deployment: str,
                          fault: str | None = None) -> dict[str, Any]:
        """Register a version deployed in a side application (at 0% until a plan or weights route to it)."""
        if name not in self.versions:
            handle = serve.get_deployment_handle(deployment, app_name=app)
            self.versions[name] = _Version(name=name, ref=ref, app=app, deployment=deployment, fault=fault,
                                           client=ServeEngineClient(handle,
                                                                    retry_after_s=self.serve_cfg.retry_after_s))
            self._event("version_added", version=name, ref=ref)
        return {"ok": True, "status": await self.status()}

    def find_version(self, ref_or_name: str) -> str | None:
        if ref_or_name in self.versions:
            return ref_or_name
        for name, v in self.versions.items():
            if v.ref == ref_or_name and not v.fault:
                return name
        return None

    async def lookup(self, ref_or_name: str) -> str | None:
        return self.find_version(ref_or_name)

    async def start(self, candidate: str, *, plan: dict[str, Any] | None = None,
                    thresholds: dict[str, Any] | None = None, force: bool = False) -> dict[str, Any]:
        """Begin a rollout of a deployed version (name or ref) under ``plan``."""
        async with self._lock:
            if self.canary is not None and self.canary.state == "running":
                return _fail("conflict", f"a canary of {self.canary.candidate} is already running in app "
                                         f"{self.app_name!r} ({self._canary_status(self.canary)['phase']}); "
                                         "promote or abort it first")
            name = self.find_version(candidate)
            if name is None:
                return _fail("not_found", f"{candidate!r} is not a version of app {self.app_name!r} "
                                          f"(versions: {', '.join(self.versions)})")
            if name == self.stable:
                return _fail("conflict", f"{name} is already the stable version")
            try:
                plan_cfg = load_config(CanaryPlan, plan if plan is not None else to_dict(self.cfg.plan))
                th_cfg = load_config(CanaryThresholds, thresholds if thresholds is not None
                                     else to_dict(self.cfg.thresholds))
            except ConfigError as exc:
                return _fail("config", str(exc), problems=exc.problems)
            ref = self.versions[name].ref
            if ref and plan_cfg.auto_promote and plan_cfg.steps:
                ok, why = await asyncio.to_thread(gate, self.registry, ref, self.cfg.alias)
                if not ok and not force:
                    return _fail("refused", f"refusing to start a canary of {ref}: {why}; a clean plan could "
                                            "not promote it. Validate it first, or pass force=True "
                                            "(the promotion is then recorded as forced)")
            now = time.monotonic()
            c = _Canary(candidate=name, stable=self.stable, plan=plan_cfg, thresholds=th_cfg, force=force,
                        started_at=now, started_wall=time.time(), step_started_at=now)
            self.canary = c
            self._metrics.started()
            self._event("canary_started", candidate=name, plan=to_dict(plan_cfg), forced=force)
            if plan_cfg.shadow_hold_s <= 0:
                c.step = 0
                self._set_canary_share(c, plan_cfg.steps[0])
            return {"ok": True, "status": await self.status()}

    async def promote(self, *, force: bool = False, reason: str | None = None) -> dict[str, Any]:
        """Promote the running (or refused) candidate now: 100% of traffic and the registry alias."""
        async with self._lock:
            c = self.canary
            if c is None or c.state not in ("running", "promotion_refused", "shadow_done"):
                return _fail("conflict", f"no canary to promote in app {self.app_name!r}"
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
            if c is None or c.state != "running":
                return _fail("conflict", f"no canary is running in app {self.app_name!r}")
            self._end(c, "aborted", reason or "aborted by hand")
            return {"ok": True, "status": await self.status()}

    async def rollback(self, *, reason: str | None = None) -> dict[str, Any]:
        """Route everything back to the previous stable version and roll the registry alias back.

        During a canary this is an abort. Replicas keep running; in-flight requests finish where they are.
        """
        async with self._lock:
            c = self.canary
            if c is not None and c.state == "running":
                self._end(c, "aborted", reason or "rolled back by hand")
                return {"ok": True, "status": await self.status(), "registry_event": None}
            if self.previous is None or self.previous not in self.versions:
                return _fail("conflict", f"app {self.app_name!r} has no previous version to roll back to "
                                         f"(stable: {self.stable})")
            current, target = self.stable, self.previous
            self.weights = {target: 100.0}  # the routing change: effective for the next request
            self.stable, self.previous = target, current
            self._metrics.ended("rollback")
            self._event("rollback", to=target, frm=current, reason=reason)
            event = None
            ref_now, ref_back = self.versions[current].ref, self.versions[target].ref
            if ref_now and ref_back:
                name = ref_now.split("@")[0]
                try:
                    held = (await asyncio.to_thread(self.registry.aliases, name)).get(self.cfg.alias)
                    if held == int(ref_now.rsplit("@v", 1)[1]):
                        event = await asyncio.to_thread(self.registry.rollback, name, self.cfg.alias,
                                                        reason=reason or f"rollback of app {self.app_name}")
                except LLMStackError as exc:
                    event = {"error": str(exc)}
            return {"ok": True, "status": await self.status(), "registry_event": event}

    async def set_weights(self, weights: dict[str, float]) -> dict[str, Any]:
        """A static split between deployed versions (not while a canary runs)."""
        async with self._lock:
            if self.canary is not None and self.canary.state == "running":
                return _fail("conflict", "a canary is running: its plan owns the weights; abort it first")
            problems = check_weights({k: float(v) for k, v in weights.items()}, known=list(self.versions))
            if not weights:
                problems.append("weights: empty")
            if problems:
                return _fail("config", str(ConfigError(problems)), problems=problems)
            self.weights = {k: float(v) for k, v in weights.items() if float(v) > 0}
            self._event("weights", weights=dict(self.weights))
            return {"ok": True, "status": await self.status()}

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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    for line in reversed(text):
        if "Error" in line or "fault" in line:
            return line.strip()[:300]
    return (text[0] if text else "")[:300]


def _fail(kind: str, message: str, *, problems: list[str] | None = None) -> dict[str, Any]:
    return {"ok": False, "error": {"kind": kind, "message": message, "problems": problems or [message]}}


def gate(registry: Any, ref: str, alias: str) -> tuple[bool, str]:
    """Would ``Registry.promote(ref, alias)`` pass its validation gate? ``(ok, why not)``."""
    from llmstack.registry import ArtifactRef, validation_key

    target = registry.resolve(ref)
    held = registry.aliases(target.name).get(alias)
    if held is None or held == target.version:
        return True, ""
    baseline = ArtifactRef(target.name, held)
    data = registry.annotations(target).get(validation_key(baseline))
    if data is None:
        return False, f"it has no validation report against {baseline} (the holder of {target.name}@{alias})"
    if not data.get("passed"):
        return False, (f"its validation against {baseline} failed: "
                       + ", ".join(data.get("failed_checks") or ["?"]))
    return True, ""


class _RouterMetrics:
    """Prometheus metrics of the router: per-version requests, errors, bad outputs, latency, TTFT, weights."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter as PCounter, Histogram

        from llmstack.serve.metrics import LATENCY_BUCKETS

        r = self.registry = CollectorRegistry()
        self.requests = PCounter("llmstack_canary_requests", "Requests routed to each version", ["version"],
                                 registry=r)
        self.outcomes = PCounter("llmstack_canary_outcomes", "Finished requests by version and outcome "
                                 "(ok, error, bad_output; shadow=true for mirrored ones)",
                                 ["version", "outcome", "shadow"], registry=r)
        self.latency = Histogram("llmstack_canary_latency_seconds", "Router-measured latency per version",
                                 ["version"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("llmstack_canary_ttft_seconds", "Time to first token per version", ["version"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.canaries = PCounter("llmstack_canary_transitions", "Canaries started and how they ended",
                                 ["event"], registry=r)

    def routed(self, name: str) -> None:
        self.requests.labels(name).inc()

    def observe(self, name: str, obs: _Obs) -> None:
        outcome = "error" if obs.error else "bad_output" if obs.bad else "ok"
        self.outcomes.labels(name, outcome, str(obs.shadow).lower()).inc()
        if not obs.error:
            self.latency.labels(name).observe(obs.latency)
            if obs.ttft is not None:
                self.ttft.labels(name).observe(obs.ttft)

    def started(self) -> None:
        self.canaries.labels("started").inc()

    def ended(self, state: str) -> None:
        self.canaries.labels(state).inc()

    def render(self, router: CanaryRouter) -> str:
        from prometheus_client import generate_latest

        lines = [generate_latest(self.registry).decode()]
        now = time.monotonic()
        window = router.cfg.thresholds.window_s
        gauges = {"weight_percent": "Traffic share of each version (percent)",
                  "error_rate": "5xx rate over the KPI window", "bad_output_rate": "Empty/degenerate output rate",
                  "latency_p50_seconds": "p50 latency over the window", "latency_p95_seconds": "p95 latency",
                  "ttft_p50_seconds": "p50 time to first token", "ttft_p95_seconds": "p95 time to first token"}
        keys = {"error_rate": "error_rate", "bad_output_rate": "bad_output_rate", "latency_p50_seconds": "p50_s",
                "latency_p95_seconds": "p95_s", "ttft_p50_seconds": "ttft_p50_s", "ttft_p95_seconds": "ttft_p95_s"}
        rows = {n: _KPIs.summarize([o for o in v.kpi.window(0, now, window) if not o.shadow])
                for n, v in router.versions.items()}
        for metric, help_text in gauges.items():
            lines.append(f"# HELP llmstack_canary_{metric} {help_text}\n# TYPE llmstack_canary_{metric} gauge\n")
            for name in router.versions:
                value = router.weights.get(name, 0.0) if metric == "weight_percent" else rows[name][keys[metric]]
                if value is not None:
                    lines.append(f'llmstack_canary_{metric}{{version="{_label(name)}"}} {float(value)}\n')
        return "".join(lines)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


RouterDeployment = serve.deployment(name=ROUTER, num_replicas=1, max_ongoing_requests=100_000,
                                    ray_actor_options={"num_cpus": 0.1}, health_check_period_s=10)(CanaryRouter)


# --------------------------------------------------------------------------- the ingress


_SLOT: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("llmstack_canary_slot", default=None)


class CanaryEngineClient(ServeEngineClient):
    """The engine protocol over the router's handle; passes the session key, notes which version answered."""

    CARDS_TTL_S = 5.0  # the stable version may change

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        slot = _SLOT.get() or {}
        version, result = await self._call(self.handle.generate, request, slot.get("key"))
        slot["version"] = version
        if isinstance(result, ErrorInfo):
            raise result.to_error()
        return result

    async def stream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        slot = _SLOT.get() or {}
        responses = self.handle.options(stream=True).stream.remote(request, slot.get("key"))
        # The router sends {"version": ...} first: which version answers this stream.
        relay = self._relay(responses, on_marker=lambda marker: slot.__setitem__("version", marker.get("version")))
        async with contextlib.aclosing(relay) as chunks:
            async for chunk in chunks:
                yield chunk

    async def check_health(self) -> None:
        await self.handle.backend_health.remote()


class _SessionKey:
    """ASGI middleware: the session key (header, else the body's ``user``) for sticky routing; the answering
    version as a response header."""

    def __init__(self, app: Any, *, header: str, max_body_bytes: int) -> None:
        self.app = app
        self.header = header.lower().encode()
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        key = headers.get(self.header, b"").decode("latin-1").strip() or None
        slot: dict[str, Any] = {"key": key, "version": None}
        downstream = receive
        if key is None and scope.get("method") == "POST":
            body = bytearray()
            first: list[dict] = []
            while True:  # bounded: past the limit the guard inside answers 413
                message = await receive()
                first.append(message)
                if message["type"] != "http.request":
                    break
                body += message.get("body", b"")
                if not message.get("more_body") or len(body) > self.max_body_bytes:
                    break
            if len(body) <= self.max_body_bytes:
                try:
                    user = json.loads(body).get("user")
                    if isinstance(user, str) and user:
                        slot["key"] = user
                except (ValueError, AttributeError):
                    pass
            pending = list(first)

            async def replay() -> dict:
                if pending:
                    return pending.pop(0)
                return await receive()

            downstream = replay

        async def send_with_version(message: dict) -> None:
            if message["type"] == "http.response.start" and slot.get("version"):
                message = {**message, "headers": [*message.get("headers", []),
                                                  (VERSION_HEADER.encode(), str(slot["version"]).encode())]}
            await send(message)

        token = _SLOT.set(slot)
        try:
            await self.app(scope, downstream, send_with_version)
        finally:
            _SLOT.reset(token)


_ERROR_STATUS = {"conflict": 409, "not_found": 404, "config": 400, "refused": 403, "registry": 409}


def _add_admin_routes(app: Any, router: Any) -> None:
    async def reply(call: Any) -> JSONResponse:
        result = await call
        if isinstance(result, dict) and result.get("ok") is False:
            err = result["error"]
            return error_response(EngineError(err["message"], status_code=_ERROR_STATUS.get(err["kind"], 400),
                                              type="canary_error", code=err["kind"]))
        return JSONResponse(json.loads(json.dumps(result, default=str)))

    async def body_of(request: Request) -> dict[str, Any]:
        raw = await request.body()
        if not raw:
            return {}
        try:
            data = json.loads(raw)
        except ValueError:
            raise EngineError("request body is not valid JSON", code="invalid_json") from None
        if not isinstance(data, dict):
            raise EngineError("request body must be a JSON object")
        return data

    @app.get("/canary", summary="Canary status: versions, weights, live KPIs, the rollout in progress")
    async def canary_status_route() -> JSONResponse:
        return await reply(router.status.remote())  # type: ignore[arg-type]

    @app.post("/canary/start", summary="Start a rollout of a deployed version: {candidate, plan?, thresholds?, force?}")
    async def canary_start_route(request: Request) -> JSONResponse:
        b = await body_of(request)
        if not isinstance(b.get("candidate"), str):
            raise EngineError("candidate: a deployed version name or registry ref is required", param="candidate")
        return await reply(router.start.remote(b["candidate"], plan=b.get("plan"), thresholds=b.get("thresholds"),
                                               force=bool(b.get("force", False))))

    @app.post("/canary/promote", summary="Promote the candidate now: {force?, reason?}")
    async def canary_promote_route(request: Request) -> JSONResponse:
        b = await body_of(request)
        return await reply(router.promote.remote(force=bool(b.get("force", False)), reason=b.get("reason")))

    @app.post("/canary/abort", summary="Abort the canary: the candidate's share drops to 0: {reason?}")
    async def canary_abort_route(request: Request) -> JSONResponse:
        b = await body_of(request)
        return await reply(router.abort_canary.remote(reason=b.get("reason")))

    @app.post("/canary/rollback", summary="Route back to the previous version and roll the alias back: {reason?}")
    async def canary_rollback_route(request: Request) -> JSONResponse:
        b = await body_of(request)
        return await reply(router.rollback.remote(reason=b.get("reason")))

    @app.post("/canary/weights", summary="Static traffic split between deployed versions: {weights: {name: pct}}")
    async def canary_weights_route(request: Request) -> JSONResponse:
        b = await body_of(request)
        if not isinstance(b.get("weights"), dict):
            raise EngineError("weights: a mapping of version name to percent is required", param="weights")
        try:
            weights = {str(k): float(v) for k, v in b["weights"].items()}
        except (TypeError, ValueError):
            raise EngineError("weights: percentages must be numbers", param="weights") from None
        return await reply(router.set_weights.remote(weights))

    # /metrics: the ingress's own metrics followed by the router's per-version KPIs (one scrape target).
    ingress_metrics = app.state.metrics

    async def metrics_route() -> Response:
        body, content_type = ingress_metrics.render()
        extra = await router.metrics_text.remote()
        return Response(body + extra.encode(), media_type=content_type)

    from fastapi.routing import APIRoute

    app.router.routes[:] = [r for r in app.router.routes if not (isinstance(r, APIRoute) and r.path == "/metrics")]
    app.add_api_route("/metrics", metrics_route, methods=["GET"], summary="Prometheus metrics (with canary KPIs)",
                      response_class=Response)


@serve.deployment(name=INGRESS)
@serve.ingress()
class CanaryIngress:
    """HTTP ingress of a canary app: the OpenAI API over the router, admin routes under /canary."""

    def __init__(self, router: Any, config: dict[str, Any], session_header: str = "x-session-id") -> None:
        self.config = load_config(ServeConfig, config)
        self.router = router
        self.session_header = session_header

    def __serve_build_asgi_app__(self) -> Any:
        app = make_api(CanaryEngineClient(self.router, retry_after_s=self.config.retry_after_s), self.config)
        _add_admin_routes(app, self.router)
        app.add_middleware(_SessionKey, header=self.session_header, max_body_bytes=self.config.max_body_bytes)
        return app


# --------------------------------------------------------------------------- assembly


def build_canary_app(args: dict[str, Any] | None = None) -> Any:
    """The Serve ``Application`` of a canary config: ingress -> router -> one deployment per version.

    This is the ``import_path`` of ``serve_configs/canary.yaml`` (``llmstack.serve.canary:build_canary_app``).

    Raises:
        ConfigError: bad fields, weights not summing to 100.
        ArtifactNotFoundError: the stable or candidate model is not in the registry.

    Example:
        >>> app = build_canary_app({"stable": "tiny-lm@v1", "candidate": "tiny-lm@v2"})  # doctest: +SKIP
    """
    spec = resolve_canary(args or {})
    canary = load_config(CanaryConfig, spec["canary"])
    handles = {}
    for v in spec["versions"]:
        v["app"] = spec["serve"]["app_name"]
        handles[v["name"]] = version_deployment(ResolvedVersion(**v), replicas=canary.version_replicas)
    router = RouterDeployment.bind(spec, handles)
    return CanaryIngress.options(max_ongoing_requests=100_000, ray_actor_options={"num_cpus": 0.1}).bind(
        router, spec["serve"], canary.session_header)


@dataclasses.dataclass
class CanaryDeployment:
    """A running canary app: base URL, app name; ``shutdown()`` also removes versions added at run time."""

    url: str
    app_name: str
    spec: dict[str, Any]

    @property
    def openai_base_url(self) -> str:
        return self.url.rstrip("/") + "/v1"

    def shutdown(self) -> None:
        from ray import serve as _serve

        try:
            apps = list(_serve.status().applications)
        except Exception:
            apps = []
        for name in [a for a in apps if a.startswith(self.app_name + "--")] + [self.app_name]:
            try:
                _serve.delete(name)
            except Exception:
                pass

    def __enter__(self) -> CanaryDeployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def deploy_canary(config: dict[str, Any] | str | None = None, **overrides: Any) -> CanaryDeployment:
    """Run a canary app (stable + candidate + router) on Ray Serve and return once it is up.

    Args:
        config: flat canary args (see :class:`CanaryConfig`, plus ServeConfig fields) or a YAML path.
        **overrides: fields to replace, e.g. ``port=8123``.
    """
    import ray

    if isinstance(config, str):
        cfg, serve_cfg = load_canary_config(config)
        config = {**to_dict(cfg), **{k: v for k, v in to_dict(serve_cfg).items() if k != "model"}}
    args = {**(config or {}), **overrides}
    app = build_canary_app(args)
    spec = resolve_canary(args)
    serve_cfg = load_config(ServeConfig, spec["serve"])
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, log_to_driver=False,
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    serve.start(http_options={"host": serve_cfg.host, "port": serve_cfg.port})
    try:
        serve.run(app, name=serve_cfg.app_name, route_prefix=serve_cfg.route_prefix)
    except Exception as exc:
        from llmstack.errors import ModelLoadError

        raise ModelLoadError(f"the canary application {serve_cfg.app_name!r} failed to start: {exc}") from None
    host, port = serve_cfg.host, serve_cfg.port
    try:
        from ray.serve.context import _get_global_client

        http = _get_global_client().http_config
        host, port = http.host, http.port
    except Exception:
        pass
    host = "127.0.0.1" if host in ("0.0.0.0", "", None) else host
    prefix = "" if serve_cfg.route_prefix == "/" else serve_cfg.route_prefix.rstrip("/")
    return CanaryDeployment(url=f"http://{host}:{port}{prefix}", app_name=serve_cfg.app_name, spec=spec)


# --------------------------------------------------------------------------- driver-side operations (CLI)


def _router(app_name: str, address: str | None) -> Any:
    import ray

    if not ray.is_initialized():
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or "auto", log_to_driver=False)
    try:
        status = serve.status()
    except Exception as exc:
        raise CanaryError(f"Ray Serve is not running on this cluster: {exc}") from None
    app = status.applications.get(app_name)
    if app is None or ROUTER not in app.deployments:
        canaries = [n for n, a in status.applications.items() if ROUTER in a.deployments]
        raise CanaryError(f"no canary app named {app_name!r} is running (canary apps: "
                          f"{', '.join(canaries) or 'none'}); start one with serve_configs/canary.yaml")
    return serve.get_deployment_handle(ROUTER, app_name=app_name)


def _unwrap(result: dict[str, Any]) -> dict[str, Any]:
    if result.get("ok"):
        return result
    err = result["error"]
    kind, message = err["kind"], err["message"]
    if kind == "config":
        raise ConfigError(err.get("problems") or [message])
    if kind == "not_found":
        raise ArtifactNotFoundError(message)
    if kind == "refused":
        raise ValidationFailedError(message)
    raise CanaryError(message)


def canary_status(*, app_name: str = "llmstack-canary", address: str | None = None) -> dict[str, Any]:
    """Status of a running canary app: versions, weights, live KPIs, the rollout in progress.

    Example:
        >>> print(format_status(canary_status(app_name="llmstack-canary")))  # doctest: +SKIP
    """
    return _router(app_name, address).status.remote().result()


def canary_start(candidate: str, *, app_name: str = "llmstack-canary", plan: dict[str, Any] | None = None,
                 thresholds: dict[str, Any] | None = None, force: bool = False, address: str | None = None,
                 timeout_s: float = 300.0) -> dict[str, Any]:
    """Start a progressive rollout of ``candidate`` (a registry ref or a deployed version's name).

    A ref the app does not serve yet is deployed first, as a side application ``<app>--<version>`` with
    the app's serving settings (existing replicas are untouched), then the plan begins.

    Raises:
        ArtifactNotFoundError: the candidate is not in the registry.
        CanaryError: a canary is already running (or the app is not running).
        ValidationFailedError: its validation report failed (or is missing) and ``force`` is not set.
        ConfigError: a bad plan or thresholds.
    """
    router = _router(app_name, address)
    status = router.status.remote().result()
    if status["running"]:
        c = status["canary"]
        raise CanaryError(f"a canary of {c['candidate']} is already running in app {app_name!r} ({c['phase']}); "
                          "promote or abort it first")
    if plan is not None:
        load_config(CanaryPlan, plan)
    if thresholds is not None:
        load_config(CanaryThresholds, thresholds)
    name = router.lookup.remote(candidate).result()
    if name is None:
        serve_cfg = load_config(ServeConfig, status["serve"])
        version = resolve_version(VersionSpec(model=candidate), serve_cfg, taken=set(status["versions"]),
                                  role="candidate")
        name = router.lookup.remote(version.ref or version.name).result()
        steps = (plan or status["canary_defaults"]["plan"]).get("steps", [1])
        if name is None and version.ref and not force and steps:
            from llmstack.registry import Registry

            ok, why = gate(Registry(serve_cfg.registry), version.ref, status["alias"])
            if not ok:  # refuse before deploying anything
                raise ValidationFailedError(f"refusing to start a canary of {version.ref}: {why}; a clean plan "
                                            "could not promote it. Validate it first, or pass force=True "
                                            "(the promotion is then recorded as forced)")
        if name is None:
            side = f"{app_name}--{re.sub(r'[^A-Za-z0-9_.-]+', '-', version.name)}"
            version.app = side
            serve.run(version_deployment(version), name=side, route_prefix=None)
            _wait_running(side, timeout_s)
            _unwrap(router.add_version.remote(version.name, version.ref, side, version.deployment).result())
            name = version.name
    return _unwrap(router.start.remote(name, plan=plan, thresholds=thresholds, force=force).result())


def _wait_running(app: str, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        state = serve.status().applications.get(app)
        if state is not None and str(state.status).endswith("RUNNING"):
            return
        if state is not None and str(state.status).endswith("DEPLOY_FAILED"):
            raise CanaryError(f"version app {app!r} failed to deploy: {state.message}")
        time.sleep(0.5)
    raise CanaryError(f"version app {app!r} did not become healthy within {timeout_s:.0f} s")


def canary_promote(*, app_name: str = "llmstack-canary", force: bool = False, reason: str | None = None,
                   address: str | None = None) -> dict[str, Any]:
    """Promote the candidate now: it takes 100% of traffic and the registry alias moves (Registry.promote).

    Raises:
        ValidationFailedError: its validation report failed or is missing (unless ``force``; a forced
            promotion is recorded as ``force-promote`` in the registry history).
        CanaryError: no canary to promote.
    """
    return _unwrap(_router(app_name, address).promote.remote(force=force, reason=reason).result())


def canary_abort(*, app_name: str = "llmstack-canary", reason: str | None = None,
                 address: str | None = None) -> dict[str, Any]:
    """Abort the running canary: the candidate's share drops to 0 at once; in-flight requests finish."""
    return _unwrap(_router(app_name, address).abort_canary.remote(reason=reason).result())


def rollback_app(*, app_name: str = "llmstack-canary", reason: str | None = None,
                 address: str | None = None) -> dict[str, Any]:
    """Route a running app back to its previous version and roll the registry alias back (no restarts).

    During a canary this aborts it. Returns ``{"ok", "status", "registry_event"}``.
    """
    return _unwrap(_router(app_name, address).rollback.remote(reason=reason).result())


def set_weights(weights: dict[str, float], *, app_name: str = "llmstack-canary",
                address: str | None = None) -> dict[str, Any]:
    """Set a static traffic split between deployed versions. Raises ConfigError unless they sum to 100."""
    problems = check_weights({k: float(v) for k, v in weights.items()}, known=None)
    if problems:
        raise ConfigError(problems)
    return _unwrap(_router(app_name, address).set_weights.remote(weights).result())


def format_status(status: dict[str, Any]) -> str:
    """A terminal-readable view of :func:`canary_status`."""
    lines = [f"app {status['app']}: stable {status['stable']}"
             + (f", previous {status['previous']}" if status.get("previous") else "")]
    lines.append(f"{'version':<28} {'weight':>6} {'reqs':>6} {'err%':>6} {'bad%':>6} {'p50 ms':>8} "
                 f"{'p95 ms':>8} {'ttft ms':>8}")
    for name, v in status["versions"].items():
        k = v["kpis"]

        def ms(x: float | None) -> str:
            return "-" if x is None else f"{1000 * x:.0f}"

        lines.append(f"{name + (' [fault:' + v['fault'] + ']' if v.get('fault') else ''):<28} {v['weight']:>6.1f} "
                     f"{k['requests']:>6} {100 * k['error_rate']:>6.1f} {100 * k['bad_output_rate']:>6.1f} "
                     f"{ms(k['p50_s']):>8} {ms(k['p95_s']):>8} {ms(k['ttft_p50_s']):>8}")
    c = status.get("canary")
    if c:
        lines.append(f"canary {c['candidate']}: {c['state']} ({c['phase']}, {c['share']:g}%)"
                     + (f" - {c['reason']}" if c.get("reason") else ""))
        if c.get("first_bad_to_zero_s") is not None:
            lines.append(f"  first bad response -> 0% traffic: {c['first_bad_to_zero_s']:.2f} s")
    return "\n".join(lines)


__all__ = [
    "CanaryConfig", "CanaryDeployment", "CanaryError", "CanaryPlan", "CanaryThresholds", "VersionSpec",
    "build_canary_app", "canary_abort", "canary_promote", "canary_start", "canary_status", "deploy_canary",
    "format_status", "gate", "is_degenerate", "load_canary_config", "resolve_canary", "rollback_app",
    "set_weights",
]
