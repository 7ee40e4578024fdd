"""Assembling a multi-region app: one model deployment pinned per region, the global router as the ingress.

Topology (one Serve application)::

    HTTP ─▶ RegionIngress ×router_replicas (OpenAI API + /regions; policy, health, retries, cost;
               │                          overrides and ejections shared through one small board actor)
               │  the engine protocol per region (ServeEngineClient)
               ├─▶ LLMServer-us-east ×replicas   (ray_actor_options.resources: {"region:us-east": 0.001})
               └─▶ LLMServer-eu-west ×replicas   (... on the nodes started with --resources '{"region:eu-west": 1}')

A region is the set of live Ray nodes holding its custom resource; each replica asks for a sliver of it,
so Ray places it there and nowhere else. A region without such a node fails the deploy, by name.
"""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any

from llmstack.config import ServeConfig, load_config, to_dict
from llmstack.errors import ResourceError
from llmstack.serve.deployments.builder import (INGRESS_OPTIONS, INGRESS_RESOURCES, Deployment, replica_resources,
                                                resolve_config, run_app, server_options)
from llmstack.serve.regions.config import RegionsConfig, load_regions_config, spec_of

REGION_RESOURCE_SHARE = 0.001  # what one replica asks of its region's marker resource (any node holds 1)


def resolve_regions(args: dict[str, Any] | str | None) -> dict[str, Any]:
    """Parse the flat args and pin the model (and adapters) once: the spec every region's replicas load.

    Raises:
        ConfigError: every bad field, with its key path.
        ArtifactNotFoundError: the model is not in the registry.
    """
    cfg, serve_cfg = load_regions_config(args)
    return spec_of(cfg, resolve_config(serve_cfg))


def build_regions_app(args: dict[str, Any] | None = None) -> Any:
    """The Serve ``Application`` of a multi-region config (the ``import_path`` of serve_configs/multi-region.yaml).

    When Ray is connected (``serve run`` connects first) the regions' nodes are checked here already.

    Raises:
        ConfigError: bad fields (unknown policy, prices <= 0, weights naming unknown regions, ...).
        ResourceError: a region has no live node on the connected cluster.

    Example:
        >>> app = build_regions_app({"model": "tiny-lm@production",  # doctest: +SKIP
        ...                          "regions": {"us-east": {"price_per_replica_hour": 2.0}}})
    """
    import ray

    spec = resolve_regions(args or {})
    if ray.is_initialized():
        check_region_nodes(spec)
    return app_of(spec)


def app_of(spec: dict[str, Any]) -> Any:
    """The Application of a resolved spec: a pinned ``LLMServer`` deployment per region, then the router."""
    from llmstack.serve.deployments.server import LLMServer
    from llmstack.serve.regions.ingress import RegionIngress

    cfg = load_config(ServeConfig, spec["serve"])
    spec = {**spec, "deploy_id": uuid.uuid4().hex[:12]}  # names this deploy's shared board (board.py)
    handles = {name: LLMServer.options(**region_server_options(cfg, region)).bind(spec["serve"])
               for name, region in spec["regions"].items()}
    return RegionIngress.options(**router_options(spec)).bind(handles, spec)


def region_server_options(cfg: ServeConfig, region: dict[str, Any]) -> dict[str, Any]:
    """``deploy()``'s model options, with a fixed replica count and the region's marker resource."""
    options = server_options(cfg, name=region["deployment"], replicas=region["replicas"])
    actor = dict(options["ray_actor_options"])
    actor["resources"] = {region["resource"]: REGION_RESOURCE_SHARE}
    options["ray_actor_options"] = actor
    return options


def router_options(spec: dict[str, Any]) -> dict[str, Any]:
    """The router's options: ``router_replicas`` replicas, spread over nodes by Serve's default (soft)
    spreading, so a lost node takes one replica, not the entry point, while a one-node cluster still fits."""
    return {**INGRESS_OPTIONS, "num_replicas": int(spec["routing"].get("router_replicas", 2))}


def region_nodes(resource: str) -> list[dict[str, Any]]:
    """The live Ray nodes holding ``resource``."""
    import ray

    return [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get(resource, 0) > 0]


def check_region_nodes(spec: dict[str, Any]) -> None:
    """Raise ResourceError naming every region without a live node, or whose nodes lack the CPUs asked.

    Each region's replicas must fit on its own nodes (``num_cpus`` each).
    """
    cpus = float(spec["serve"].get("num_cpus", 1.0))
    missing, small = [], []
    for name, region in spec["regions"].items():
        nodes = region_nodes(region["resource"])
        if not nodes:
            missing.append(f"{name} (resource {region['resource']!r})")
            continue
        total = sum(n["Resources"].get("CPU", 0.0) for n in nodes)
        if cpus * region["replicas"] > total + 1e-9:
            small.append(f"{name}: {region['replicas']} x {cpus:g} CPUs asked, its {len(nodes)} node(s) have "
                         f"{total:g}")
    problems = []
    if missing:
        problems.append(f"no live Ray node for region(s) {', '.join(missing)}; start one with e.g. "
                        "`ray start --address=<head> --resources='{\"region:<name>\": 1}'` (or give the head that "
                        "resource), or remove the region")
    if small:
        problems.append("region(s) too small: " + "; ".join(small))
    if problems:
        raise ResourceError("cannot place the multi-region app: " + " | ".join(problems))


@dataclasses.dataclass
class RegionsDeployment(Deployment):
    """A running multi-region app (a :class:`~llmstack.serve.Deployment`) with its resolved per-region spec."""

    spec: dict[str, Any] = dataclasses.field(default_factory=dict)


def deploy_regions(config: dict[str, Any] | str | None = None, *, replace: bool = False,
                   timeout_s: float = 300.0, **overrides: Any) -> RegionsDeployment:
    """Run a multi-region app and return once every region's replicas and the router are healthy.

    Args:
        config: flat args (``regions``, ``routing`` and ServeConfig fields) or a YAML path (a serve run file).
        replace: replace a running app of the same name.
        **overrides: top-level fields to replace, e.g. ``port=8123``.

    Raises:
        ConfigError, ArtifactNotFoundError: as :func:`resolve_regions`.
        ResourceError: a region has no live node (named), or the port is taken.

    Example:
        >>> dep = deploy_regions("serve_configs/multi-region.yaml", port=8123)  # doctest: +SKIP
    """
    from llmstack._ray import connect, worker_runtime_env

    if isinstance(config, str):
        cfg, serve_cfg = load_regions_config(config)
        config = {**to_dict(serve_cfg), **_own(cfg)}
    spec = resolve_regions({**(config or {}), **overrides})
    connect(runtime_env=worker_runtime_env())
    check_region_nodes(spec)
    serve_cfg = load_config(ServeConfig, spec["serve"])
    replicas = sum(r["replicas"] for r in spec["regions"].values())
    needs = [(replica_resources(serve_cfg), replicas),
             (INGRESS_RESOURCES, int(spec["routing"].get("router_replicas", 2)))]
    url = run_app(app_of(spec), serve_cfg, replace=replace, timeout_s=timeout_s, needs=needs,
                  what="multi-region application")
    return RegionsDeployment(config=serve_cfg, url=url, app_name=serve_cfg.app_name, spec=spec)


def _own(cfg: RegionsConfig) -> dict[str, Any]:
    return {"regions": to_dict(cfg.regions), "routing": to_dict(cfg.routing)}
