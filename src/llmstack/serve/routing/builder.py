"""Assembling a routed app: the model deployments, the board, and the routing ingress in front, one path.

Topology (one Serve application)::

    HTTP ─▶ <Kind>Ingress ×N (OpenAI API + admin routes; the policy chain: region ─▶ canary ─▶ deployment)
               │  the engine protocol per model deployment          ▲ news, off the request path
               │                                                    ▼
               ├─▶ LLMServer-<version or region> ×replicas     RoutingBoard ×1 (overrides, ejections,
               └─▶ LLMServer-<region>--<version> ...             the canaries' KPIs, plans, registry writes)

``build_canary_app`` and ``build_regions_app`` resolve their configs into one spec and call :func:`app_of`.
"""

from __future__ import annotations

import uuid
from typing import Any

from ray import serve

from llmstack._modules import import_object
from llmstack.config import ServeConfig, load_config
from llmstack.errors import ConfigError
from llmstack.serve.deployments.builder import INGRESS_OPTIONS, server_options
from llmstack.serve.routing.board import BOARD, RoutingBoard

REGION_RESOURCE_SHARE = 0.001  # what one replica asks of its region's marker resource (any node holds 1)
BOARD_OPTIONS: dict[str, Any] = {"name": BOARD, "num_replicas": 1, "max_ongoing_requests": 100_000,
                                 "ray_actor_options": {"num_cpus": 0.0}, "health_check_period_s": 10}


def app_of(spec: dict[str, Any], *, ingress: str, replicas: int, drain_board: Any = None) -> Any:
    """The Application of a resolved routing spec.

    Args:
        spec: ``serve`` plus a ``canary`` scope (a canary app) and/or ``regions`` and ``routing``
            (a multi-region app; a region may carry its own ``canary`` scope).
        ingress: the ingress deployment's name (``CanaryIngress``, ``RegionIngress``).
        replicas: ingress replicas.
        drain_board: the app's :class:`~llmstack.serve.deployments.drain.DrainBoard` actor, whose signal drains
            the ingress replicas (None: ``serve run``, whose shutdown is Serve's own).
    """
    from llmstack.serve.routing.ingress import RoutingIngress

    spec = {**spec, "deploy_id": uuid.uuid4().hex[:12]}  # a redeploy never adopts an old board's state
    handles: dict[str, Any] = {}
    if spec.get("canary"):
        handles["canary"] = scope_deployments(spec["canary"], app_name=spec["serve"]["app_name"])
    if spec.get("regions"):
        handles["regions"] = {}
        cfg = load_config(ServeConfig, spec["serve"])
        for name, region in spec["regions"].items():
            if region.get("canary"):
                handles["regions"][name] = scope_deployments(region["canary"], app_name=spec["serve"]["app_name"],
                                                             region=region)
            else:
                options = region_options(server_options(cfg, name=region["deployment"],
                                                        replicas=region["replicas"]), region["resource"])
                handles["regions"][name] = server_class().options(**options).bind(spec["serve"])
    board = serve.deployment(RoutingBoard).options(**BOARD_OPTIONS).bind(spec)
    return RoutingIngress.options(**{**INGRESS_OPTIONS, "name": ingress, "num_replicas": replicas}).bind(
        handles, spec, board, drain_board)


def scope_deployments(scope: dict[str, Any], *, app_name: str, region: dict[str, Any] | None = None) -> dict[str, Any]:
    """The bound model deployment of every version of one canary (pinned to ``region``'s nodes if given)."""
    canary = scope["canary"]
    handles = {}
    for v in scope["versions"]:
        v["app"] = app_name
        if region is not None:
            replicas = region["replicas"] if v["name"] == scope["stable"] else canary["version_replicas"]
        else:
            replicas = None if v["name"] == scope["stable"] else canary["version_replicas"]
        handles[v["name"]] = version_deployment(v, replicas=replicas,
                                                resource=region["resource"] if region else None)
    return handles


def version_deployment(version: dict[str, Any], *, replicas: int | None = 1, name: str | None = None,
                       resource: str | None = None) -> Any:
    """The bound model deployment of one version, with the same options as ``deploy()``'s (``server_options``).

    ``replicas=None`` autoscales it like a plain app (the stable version); a number fixes it. A version
    with ``deployment_class`` runs that class instead of ``LLMServer`` (tests use it to inject faults);
    ``resource`` pins it to a region's nodes.
    """
    cfg = load_config(ServeConfig, version["serve"])
    options = server_options(cfg, name=name or version["deployment"], replicas=replicas)
    if resource:
        options = region_options(options, resource)
    if version.get("deployment_class"):
        server = serve.deployment(name=options["name"])(_import(version["deployment_class"]))
        return server.options(**options).bind(version["serve"], **version.get("deployment_args", {}))
    return server_class().options(**options).bind(version["serve"])


def delete_with_versions(app_name: str) -> None:
    """Delete a routed app and the side applications of versions a canary added at run time (``<app>--...``)."""
    try:
        apps = list(serve.status().applications)
    except Exception:
        apps = []
    for name in [a for a in apps if a.startswith(app_name + "--")] + [app_name]:
        try:
            serve.delete(name)
        except Exception:  # already gone
            pass


def region_options(options: dict[str, Any], resource: str) -> dict[str, Any]:
    """Model deployment options asking a sliver of the region's marker resource, so Ray places it there only."""
    actor = dict(options["ray_actor_options"])
    actor["resources"] = {resource: REGION_RESOURCE_SHARE}
    return {**options, "ray_actor_options": actor}


def server_class() -> Any:
    from llmstack.serve.deployments.server import LLMServer

    return LLMServer


def _import(path: str) -> type:
    try:
        return import_object(path)
    except ImportError as exc:
        raise ConfigError(f"deployment: cannot import {path!r} ({exc})") from None
