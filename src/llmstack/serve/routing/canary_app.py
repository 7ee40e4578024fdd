"""A canary app (the routing layer with one canary policy): ``build_canary_app`` and ``deploy_canary``."""

from __future__ import annotations

import dataclasses
from typing import Any

from llmstack.config import ServeConfig, load_config, merge_sections, to_dict
from llmstack.serve.routing.canary_config import INGRESS, load_canary_config, resolve_canary
from llmstack.serve.deployments.builder import INGRESS_RESOURCES, Deployment, replica_resources, run_draining_app
from llmstack.serve.deployments import drain
from llmstack.serve.routing.builder import app_of as routing_app, delete_with_versions


def build_canary_app(args: dict[str, Any] | None = None) -> Any:
    """The Serve ``Application`` of a canary config: the routing ingress (N replicas) -> one deployment per version.

    This is the ``import_path`` of ``serve_configs/canary.yaml`` (``llmstack.serve.canary:build_canary_app``).

    Raises:
        ConfigError: bad fields, weights not summing to 100.
        ArtifactNotFoundError: the stable or candidate model is not in the registry.

    Example:
        >>> app = build_canary_app({"stable": "tiny-lm@v1", "candidate": "tiny-lm@v2"})  # doctest: +SKIP
    """
    return app_of(resolve_canary(args or {}))


def app_of(spec: dict[str, Any], *, drain_board: Any = None) -> Any:
    """The canary ``Application`` of an already resolved spec (so every version is pinned exactly once);
    ``drain_board``: the app's ``DrainBoard`` (``deploy_canary``'s), whose signal drains the ingress replicas."""
    return routing_app(routing_spec(spec), ingress=INGRESS, replicas=router_replicas(spec), drain_board=drain_board)


def router_replicas(spec: dict[str, Any]) -> int:
    return int(spec["canary"]["router_replicas"])


def routing_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """The routing layer's spec of a resolved canary app: its serving settings and its one canary."""
    return {"serve": spec["serve"], "canary": {k: v for k, v in spec.items() if k != "serve"}}


@dataclasses.dataclass
class CanaryDeployment(Deployment):
    """A running canary app (a :class:`~llmstack.serve.Deployment`: ``url``, ``drain()``, SIGTERM drains it);
    ``shutdown()`` also removes versions added at run time."""

    spec: dict[str, Any] = dataclasses.field(default_factory=dict)

    def delete_app(self) -> None:
        delete_with_versions(self.app_name)


def deploy_canary(config: dict[str, Any] | str | None = None, **overrides: Any) -> CanaryDeployment:
    """Run a canary app (the versions behind N routing ingress replicas) on Ray Serve and return once it is up.

    Args:
        config: flat canary args (see :class:`CanaryConfig`, plus ServeConfig fields) or a YAML path.
        **overrides: fields to replace, merged into their sections, e.g. ``http={"port": 8123}``.
    """
    if isinstance(config, str):
        cfg, serve_cfg = load_canary_config(config)
        config = {**to_dict(cfg), **{k: v for k, v in to_dict(serve_cfg).items() if k != "model"}}
    spec = resolve_canary(merge_sections(config or {}, overrides))  # resolved once: @latest names one version
    serve_cfg = load_config(ServeConfig, spec["serve"])
    needs = [(replica_resources(serve_cfg), len(spec["versions"])),
             (INGRESS_RESOURCES, router_replicas(spec))]
    url, board = run_draining_app(lambda board: app_of(spec, drain_board=board), serve_cfg,
                                  what="canary application", needs=needs)
    deployment = CanaryDeployment(config=serve_cfg, url=url, app_name=serve_cfg.app_name, spec=spec, board=board,
                                  ingress_replicas=router_replicas(spec))
    drain.register(deployment)  # SIGTERM to this process drains it
    return deployment

