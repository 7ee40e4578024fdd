"""A multi-region app (the routing layer with a region policy): resolution, node checks, ``deploy_regions``.

Topology (one Serve application, assembled by :func:`llmstack.serve.routing.builder.app_of`)::

    HTTP ─▶ RegionIngress ×router_replicas (OpenAI API + /regions; policy, health, retries, cost;
               │                          overrides, ejections and canaries shared through the RoutingBoard)
               │  the engine protocol per region (ServeEngineClient, or a canary's split in its region)
               ├─▶ LLMServer-us-east ×replicas   (ray_actor_options.resources: {"region:us-east": 0.001})
               ├─▶ LLMServer-eu-west ×replicas   (... on the nodes started with --resources '{"region:eu-west": 1}')
               └─▶ LLMServer-eu-west--<candidate> (a canary in eu-west: its `canary:` block, same nodes)

A region is the set of live Ray nodes holding its custom resource; each replica asks for a sliver of it,
so Ray places it there and nowhere else. A region without such a node fails the deploy, by name.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from llmstack.config import ServeConfig, load_config, merge_sections, to_dict
from llmstack.errors import ResourceError
from llmstack.serve.routing.canary_config import resolve_scope
from llmstack.serve.deployments.builder import (INGRESS_RESOURCES, Deployment, replica_resources, resolve_config,
                                                run_draining_app)
from llmstack.serve.routing.regions_config import INGRESS, RegionsConfig, load_regions_config, spec_of
from llmstack.serve.deployments import drain
from llmstack.serve.routing.builder import app_of as routing_app, delete_with_versions


def resolve_regions(args: dict[str, Any] | str | None) -> dict[str, Any]:
    """Parse the flat args and pin the model (and adapters) once: the spec every region's replicas load. A
    region's ``canary`` is resolved too: the pinned model is its stable version, its candidate pinned beside it.

    Raises:
        ConfigError: every bad field, with its key path.
        ArtifactNotFoundError: the model (or a region's candidate) is not in the registry.
    """
    cfg, serve_cfg = load_regions_config(args)
    serve_cfg = resolve_config(serve_cfg)
    spec = spec_of(cfg, serve_cfg)
    for name, region in cfg.regions.items():
        if region.canary is not None:
            spec["regions"][name]["canary"] = resolve_scope(
                region.canary, serve_cfg, stable_model=serve_cfg.model, prefix=name,
                stable_deployment=spec["regions"][name]["deployment"], key=f"regions.{name}.canary")
    return spec


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


def app_of(spec: dict[str, Any], *, drain_board: Any = None) -> Any:
    """The Application of a resolved spec: the routing layer with a region policy (pinned deployments per
    region, a region's canary versions beside its stable one) and ``router_replicas`` ingress replicas, spread
    over nodes by Serve's default (soft) spreading, so a lost node takes one replica, not the entry point.
    ``drain_board``: the app's ``DrainBoard`` (``deploy_regions``'s), whose signal drains the ingress replicas."""
    return routing_app(spec, ingress=INGRESS, replicas=router_replicas(spec), drain_board=drain_board)


def router_replicas(spec: dict[str, Any]) -> int:
    return int(spec["routing"].get("router_replicas", 2))


def model_replicas(spec: dict[str, Any]) -> int:
    """Model replicas of the app, every region's."""
    return sum(region_replicas(region) for region in spec["regions"].values())


def region_replicas(region: dict[str, Any]) -> int:
    """Model replicas on one region's nodes: its own, plus its canary's further versions."""
    canary = region.get("canary")
    extra = (len(canary["versions"]) - 1) * int(canary["canary"]["version_replicas"]) if canary else 0
    return int(region["replicas"]) + extra


def region_nodes(resource: str) -> list[dict[str, Any]]:
    """The live Ray nodes holding ``resource``."""
    import ray

    return [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get(resource, 0) > 0]


def check_region_nodes(spec: dict[str, Any]) -> None:
    """Raise ResourceError naming every region without a live node, or whose nodes lack the CPUs asked.

    Each region's replicas must fit on its own nodes (``deployment.ray_actor_options.num_cpus`` each).
    """
    cpus = load_config(ServeConfig, spec["serve"]).replica_resources()["CPU"]
    missing, small = [], []
    for name, region in spec["regions"].items():
        nodes = region_nodes(region["resource"])
        if not nodes:
            missing.append(f"{name} (resource {region['resource']!r})")
            continue
        total = sum(n["Resources"].get("CPU", 0.0) for n in nodes)
        if cpus * region_replicas(region) > total + 1e-9:
            small.append(f"{name}: {region_replicas(region)} x {cpus:g} CPUs asked, its {len(nodes)} node(s) have "
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

    def delete_app(self) -> None:
        """Delete the application and any version a region's canary added at run time."""
        delete_with_versions(self.app_name)


def deploy_regions(config: dict[str, Any] | str | None = None, *, replace: bool = False,
                   timeout_s: float = 300.0, **overrides: Any) -> RegionsDeployment:
    """Run a multi-region app and return once every region's replicas and the router are healthy.

    Args:
        config: flat args (``regions``, ``routing`` and ServeConfig fields) or a YAML path (a serve run file).
        replace: replace a running app of the same name.
        **overrides: fields to replace, merged into their sections, e.g. ``http={"port": 8123}``.

    Raises:
        ConfigError, ArtifactNotFoundError: as :func:`resolve_regions`.
        ResourceError: a region has no live node (named), or the port is taken.

    Example:
        >>> dep = deploy_regions("serve_configs/multi-region.yaml", http={"port": 8123})  # doctest: +SKIP
    """
    from llmstack._ray import connect, worker_runtime_env

    if isinstance(config, str):
        cfg, serve_cfg = load_regions_config(config)
        config = {**to_dict(serve_cfg), **_own(cfg)}
    spec = resolve_regions(merge_sections(config or {}, overrides))
    connect(runtime_env=worker_runtime_env())
    check_region_nodes(spec)
    serve_cfg = load_config(ServeConfig, spec["serve"])
    needs = [(replica_resources(serve_cfg), model_replicas(spec)), (INGRESS_RESOURCES, router_replicas(spec))]
    url, board = run_draining_app(lambda board: app_of(spec, drain_board=board), serve_cfg, replace=replace,
                                  timeout_s=timeout_s, needs=needs, what="multi-region application")
    deployment = RegionsDeployment(config=serve_cfg, url=url, app_name=serve_cfg.app_name, spec=spec, board=board,
                                   ingress_replicas=router_replicas(spec))
    drain.register(deployment)  # SIGTERM to this process drains it
    return deployment


def _own(cfg: RegionsConfig) -> dict[str, Any]:
    regions = to_dict(cfg.regions)
    for region in regions.values():  # keys a region's canary takes from the app (refused when given)
        if region.get("canary"):
            region["canary"] = {k: v for k, v in region["canary"].items() if k not in ("stable", "router_replicas")}
    return {"regions": regions, "routing": to_dict(cfg.routing)}
