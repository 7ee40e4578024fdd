"""Multi-region configuration: the regions (price, added latency, replicas, node marker) and the routing policy.

A multi-region app's args are flat like a canary app's: any ``ServeConfig`` field (the serving settings
every region's replicas share) plus ``regions:`` (name -> :class:`RegionSpec`) and ``routing:``
(:class:`RoutingConfig`). Every problem is reported at once, each with its key path, e.g.
``regions.eu-west.price_per_replica_hour: must be > 0, got 0``.

Example:
    >>> cfg, serve_cfg = load_regions_config({"model": "tiny-lm@v1", "regions": {
    ...     "us-east": {"price_per_replica_hour": 2.0}, "eu-west": {"price_per_replica_hour": 1.0}}})
    >>> sorted(cfg.regions), cfg.routing.policy
    (['eu-west', 'us-east'], 'cost')
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from llmstack.config import ServeConfig, load_beside_serve, to_dict
from llmstack.errors import ConfigError
from llmstack.serve.routing.canary_config import CanaryConfig
from llmstack.serve.routing.headers import COST_HEADER, REGION_HEADER, RETRIED_HEADER

POLICIES = ("cost", "latency", "round_robin")
INGRESS = "RegionIngress"
__all__ = ["COST_HEADER", "INGRESS", "POLICIES", "REGION_HEADER", "RETRIED_HEADER", "RegionSpec", "RegionsConfig",
           "RoutingConfig", "load_regions_config", "spec_of"]
_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?")


@dataclass
class RegionSpec:
    """One region: a group of Ray nodes marked by a custom resource, with a price and a network distance."""

    price_per_replica_hour: float = 1.0  # dollars per model replica-hour in this region
    latency_ms: float = 0.0  # added network round trip from the router to this region (a stand-in on one site)
    replicas: int = 1  # model replicas pinned to this region's nodes
    resource: str | None = None  # the custom resource marking its nodes; None: "region:<name>"
    # a canary inside this region: the app's `model` is its stable version, `candidate` (and `versions`) run
    # beside it on this region's nodes; the other regions are untouched. Keys as a canary app's (no `stable`).
    canary: CanaryConfig | None = None

    def check(self) -> list[tuple[str, str]]:
        problems = []
        if not self.price_per_replica_hour > 0:
            problems.append(("price_per_replica_hour", f"must be > 0, got {self.price_per_replica_hour}"))
        if self.latency_ms < 0:
            problems.append(("latency_ms", f"must be >= 0, got {self.latency_ms}"))
        if self.replicas < 1:
            problems.append(("replicas", f"must be >= 1, got {self.replicas}"))
        if self.resource is not None and not self.resource.strip():
            problems.append(("resource", "must be a non-empty resource name or null"))
        return problems


@dataclass
class RoutingConfig:
    """How the global router picks a region, and when a region counts as unhealthy."""

    policy: Literal["cost", "latency", "round_robin"] = "cost"  # cost: cheapest region meeting the SLO
    slo_p95_s: float = 1.0  # latency objective: a region's recent p95 (as the router measures it) must meet it
    weights: dict[str, float] = field(default_factory=dict)  # manual override: region -> share (any scale)
    window_s: float = 30.0  # latency samples older than this are forgotten (a slow region is retried later)
    min_samples: int = 5  # samples before a region's p95 counts; fewer: the region is explored
    eject_after_failures: int = 2  # consecutive failed requests or probes that eject a region
    readmit_after_probes: int = 2  # consecutive passing probes that re-admit an ejected region
    probe_interval_s: float = 1.0  # active health probe period, per region
    probe_timeout_s: float = 2.0  # a probe slower than this fails
    attempt_timeout_s: float = 30.0  # an attempt with no answer (or first chunk) by then fails and is retried once
    # router (ingress) replicas, spread over nodes where there is room (soft); each routes on its own health
    # view and probes, and they share overrides (POST /regions/routing) and ejections through a board actor
    router_replicas: int = 2

    def check(self) -> list[tuple[str, str]]:
        problems = []
        for name in ("slo_p95_s", "window_s", "probe_interval_s", "probe_timeout_s", "attempt_timeout_s"):
            if not getattr(self, name) > 0:
                problems.append((name, f"must be > 0, got {getattr(self, name)}"))
        for name in ("min_samples", "eject_after_failures", "readmit_after_probes", "router_replicas"):
            if getattr(self, name) < 1:
                problems.append((name, f"must be >= 1, got {getattr(self, name)}"))
        for name, value in self.weights.items():
            if value < 0:
                problems.append((f"weights.{name}", f"must be >= 0, got {value}"))
        if self.weights and not sum(self.weights.values()) > 0:
            problems.append(("weights", "at least one region needs a weight > 0"))
        return problems


@dataclass
class RegionsConfig:
    """The regions of a multi-region app and its routing. ServeConfig fields sit beside these (flat)."""

    regions: dict[str, RegionSpec] = field(default_factory=dict)  # region name -> spec (at least one)
    routing: RoutingConfig = field(default_factory=RoutingConfig)

    def check(self) -> list[tuple[str, str]]:
        problems = []
        if not self.regions:
            problems.append(("regions", "at least one region is needed, e.g. {us-east: {price_per_replica_hour: 1}}"))
        for name in self.regions:
            if not _NAME.fullmatch(name):
                problems.append((f"regions.{name}", "a region name is lowercase letters, digits and '-' "
                                 "(at most 40), e.g. us-east"))
        for name in self.routing.weights:
            if name not in self.regions:
                problems.append((f"routing.weights.{name}",
                                 f"unknown region (known: {', '.join(self.regions) or 'none'})"))
        return problems

    def resource_of(self, name: str) -> str:
        """The custom resource marking region ``name``'s nodes."""
        return self.regions[name].resource or f"region:{name}"


def load_regions_config(args: dict[str, Any] | str | None) -> tuple[RegionsConfig, ServeConfig]:
    """Parse flat multi-region args (``regions``, ``routing`` plus ServeConfig fields); every problem at once.

    A ``serve run`` file (with ``applications:``) is accepted too.

    Raises:
        ConfigError: listing every problem, each with its key path.
    """
    from llmstack.config import serve_app_args

    where = None
    if isinstance(args, str):
        import yaml

        where = args
        try:
            with open(args, encoding="utf-8") as fh:
                args = yaml.safe_load(fh) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {where}") from None
        args = serve_app_args(args, source=where, import_path=REGIONS_APP_BUILDER)
    data = dict(args or {})
    own = {k: data.pop(k) for k in ("regions", "routing") if k in data}
    cfg, serve_cfg, problems = load_beside_serve(RegionsConfig, own, data)
    problems += _region_canary_problems(own.get("regions"))
    if problems:
        raise ConfigError(problems, source=where)
    return cfg, serve_cfg  # type: ignore[return-value]


def _region_canary_problems(regions: Any) -> list[str]:
    """Keys a region's canary cannot take: its stable version is the app's model, its routers the app's."""
    problems = []
    for name, region in (regions or {}).items() if isinstance(regions, dict) else ():
        canary = region.get("canary") if isinstance(region, dict) else None
        if not isinstance(canary, dict):
            continue
        if "stable" in canary:
            problems.append(f"regions.{name}.canary.stable: a region's stable version is the app's `model`; "
                            "remove this key")
        if "router_replicas" in canary:
            problems.append(f"regions.{name}.canary.router_replicas: the app's routers serve every region; "
                            "set routing.router_replicas instead")
    return problems


REGIONS_APP_BUILDER = "llmstack.serve.regions:build_regions_app"


def deployment_name(region: str) -> str:
    """The model deployment of one region."""
    return f"LLMServer-{region}"


def spec_of(cfg: RegionsConfig, serve_cfg: ServeConfig) -> dict[str, Any]:
    """Plain data for the router: the serve config and each region with its resource and deployment."""
    return {"serve": to_dict(serve_cfg), "routing": to_dict(cfg.routing),
            "regions": {name: {**to_dict(r), "resource": cfg.resource_of(name), "deployment": deployment_name(name)}
                        for name, r in cfg.regions.items()}}  # a region's `canary` is resolved by resolve_regions
