"""Canary configuration: versions, plan, thresholds, and their resolution to pinned registry versions.

A canary app's args are flat: the :class:`CanaryConfig` fields plus any ``ServeConfig`` field (the
serving settings every version shares). Every problem is reported at once, each named by its key.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any

from llmstack.config import ServeConfig, load_beside_serve, to_dict
from llmstack.errors import ArtifactNotFoundError, ConfigError, LLMStackError

INGRESS = "CanaryIngress"  # the Serve name of a canary app's routing ingress
VERSION_HEADER = "x-llmstack-version"  # response header: the version that answered


class CanaryError(LLMStackError):
    """A canary operation that conflicts with the app's state (one already running, nothing to promote, ...)."""

    status_code = 409
    type = "canary_error"
    code = "conflict"


# --------------------------------------------------------------------------- configuration


@dataclass
class VersionSpec:
    """One model version served side by side with the others."""

    model: str  # registry ref (name, name@vN, name@alias) or local model directory
    name: str = ""  # version name used in weights and status; default: the resolved ref, e.g. tiny-lm@v2
    deployment: str | None = None  # "module:Class" of the replica to run it (default LLMServer; tests inject faults)
    deployment_args: dict[str, Any] = field(default_factory=dict)  # extra keyword arguments of that class

    def check(self) -> list[tuple[str, str]]:
        problems = []
        if self.deployment is not None and not _IMPORT_PATH.fullmatch(self.deployment):
            problems.append(("deployment", f"must be an import path 'module:Class', got {self.deployment!r}"))
        return problems


_IMPORT_PATH = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


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
    router_replicas: int = 2  # ingress replicas routing requests (they share weights and KPIs through the board)

    def check(self) -> list[tuple[str, str]]:
        if self.router_replicas < 1:
            return [("router_replicas", f"must be >= 1, got {self.router_replicas}")]
        return []


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
    cfg, serve_cfg, problems = load_beside_serve(CanaryConfig, canary_data, serve_data)
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
    deployment_class: str | None = None  # "module:Class" replacing LLMServer (VersionSpec.deployment)
    deployment_args: dict[str, Any] = field(default_factory=dict)
    app: str = ""  # Serve application holding its deployment
    deployment: str = ""


def deployment_name(version: str) -> str:
    return "LLMServer-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", version)


def resolve_version(spec: VersionSpec, serve_cfg: ServeConfig, *, taken: set[str], role: str) -> ResolvedVersion:
    """Pin ``spec.model`` to a concrete registry version (or keep the directory) and name the version.

    Raises:
        ArtifactNotFoundError: the model is not in the registry (names the role: stable / candidate).
    """
    from llmstack.serve.deployments.builder import resolve_config

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
    return ResolvedVersion(name=name, ref=ref, serve=to_dict(pinned), deployment_class=spec.deployment,
                           deployment_args=dict(spec.deployment_args), deployment=deployment_name(name))


def resolve_canary(args: CanaryConfig | dict[str, Any] | str | None) -> dict[str, Any]:
    """Parse and resolve a canary config into plain data for the routing layer: versions, weights, plan.

    Raises:
        ConfigError: bad fields; weights not summing to 100 or naming unknown versions.
        ArtifactNotFoundError: the stable or candidate model is not in the registry.
    """
    cfg, serve_cfg = load_canary_config(args if not isinstance(args, CanaryConfig) else to_dict(args))
    from llmstack.registry import Registry

    registry = Registry(serve_cfg.registry) if serve_cfg.registry else Registry()
    serve_cfg = dataclasses.replace(serve_cfg, registry=registry.url)
    return {"serve": to_dict(serve_cfg), **resolve_scope(cfg, serve_cfg, stable_model=cfg.stable)}


def resolve_scope(cfg: CanaryConfig, serve_cfg: ServeConfig, *, stable_model: str, prefix: str = "",
                  stable_deployment: str | None = None, key: str = "") -> dict[str, Any]:
    """Pin one canary's versions (the stable one, the candidate, further ones) and check its weights.

    Args:
        prefix: the region's name for a canary inside a region (names its version deployments).
        stable_deployment: the stable version's deployment name (a region keeps ``LLMServer-<region>``).
        key: where this canary sits in the config (``regions.eu-west.canary``), for error messages.

    Raises:
        ConfigError: weights naming unknown versions or not summing to 100; ``start`` without a candidate.
        ArtifactNotFoundError: a version's model is not in the registry.
    """
    taken: set[str] = set()
    stable = resolve_version(VersionSpec(model=stable_model), serve_cfg, taken=taken, role="stable")
    versions = [stable]
    candidate = None
    if cfg.candidate:
        candidate = resolve_version(VersionSpec(model=cfg.candidate), serve_cfg, taken=taken, role="candidate")
        versions.append(candidate)
    for i, spec in enumerate(cfg.versions):
        versions.append(resolve_version(spec, serve_cfg, taken=taken, role=f"versions[{i}]"))
    if prefix:
        for v in versions:
            v.deployment = deployment_name(f"{prefix}--{v.name}")
    if stable_deployment:
        stable.deployment = stable_deployment
    names = [v.name for v in versions]
    roles = {"stable": stable.name, **({"candidate": candidate.name} if candidate else {})}
    weights = {roles.get(k, k): float(v) for k, v in cfg.weights.items()} or {stable.name: 100.0}
    problems = check_weights(weights, known=names)
    if cfg.start and candidate is None:
        problems.append("start: needs a `candidate`")
    if problems:
        raise ConfigError([f"{key}.{p}" if key else p for p in problems])
    return {"canary": to_dict(cfg), "stable": stable.name, "candidate": candidate.name if candidate else None,
            "weights": weights, "versions": [dataclasses.asdict(v) for v in versions]}


def refusal(ref: str, why: str) -> str:
    """Why a canary of ``ref`` is refused before it starts (its validation gate fails)."""
    return (f"refusing to start a canary of {ref}: {why}; a clean plan could not promote it. "
            "Validate it first, or pass force=True (the promotion is then recorded as forced)")
