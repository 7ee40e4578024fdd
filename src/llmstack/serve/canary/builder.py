"""Assembling a canary app: ingress -> router -> one model deployment per version, and ``deploy_canary``."""

from __future__ import annotations

import dataclasses
from typing import Any

from ray import serve

from llmstack._modules import import_object
from llmstack.config import ServeConfig, load_config, merge_sections, to_dict
from llmstack.errors import ConfigError
from llmstack.serve.canary.config import CanaryConfig, ResolvedVersion, load_canary_config, resolve_canary
from llmstack.serve.canary.ingress import CanaryIngress
from llmstack.serve.canary.router import RouterDeployment
from llmstack.serve.deployments.builder import (INGRESS_OPTIONS, INGRESS_RESOURCES, replica_resources, run_app,
                                                server_options)
from llmstack.serve.deployments.server import LLMServer


def build_canary_app(args: dict[str, Any] | None = None) -> Any:
    """The Serve ``Application`` of a canary config: ingress -> router -> one deployment per version.

    This is the ``import_path`` of ``serve_configs/canary.yaml`` (``llmstack.serve.canary:build_canary_app``).

    Raises:
        ConfigError: bad fields, weights not summing to 100.
        ArtifactNotFoundError: the stable or candidate model is not in the registry.

    Example:
        >>> app = build_canary_app({"stable": "tiny-lm@v1", "candidate": "tiny-lm@v2"})  # doctest: +SKIP
    """
    return app_of(resolve_canary(args or {}))


def app_of(spec: dict[str, Any]) -> Any:
    """The canary ``Application`` of an already resolved spec (so every version is pinned exactly once)."""
    canary = load_config(CanaryConfig, spec["canary"])
    handles = {}
    for v in spec["versions"]:
        v["app"] = spec["serve"]["app_name"]
        version = ResolvedVersion(**v)
        replicas = None if version.name == spec["stable"] else canary.version_replicas
        handles[v["name"]] = version_deployment(version, replicas=replicas)
    router = RouterDeployment.bind(spec, handles)
    return CanaryIngress.options(**INGRESS_OPTIONS).bind(router, spec["serve"], canary.session_header)


def version_deployment(version: ResolvedVersion, *, replicas: int | None = 1, name: str | None = None) -> Any:
    """The bound model deployment of one version, with the same options as ``deploy()``'s (``server_options``).

    ``replicas=None`` autoscales it like a plain app (the stable version); a number fixes it. A version
    with ``deployment_class`` runs that class instead of ``LLMServer`` (tests use it to inject faults).
    """
    cfg = load_config(ServeConfig, version.serve)
    options = server_options(cfg, name=name or version.deployment, replicas=replicas)
    if version.deployment_class:
        server = serve.deployment(name=options["name"])(_import(version.deployment_class))
        return server.options(**options).bind(version.serve, **version.deployment_args)
    return LLMServer.options(**options).bind(version.serve)


def _import(path: str) -> type:
    try:
        return import_object(path)
    except ImportError as exc:
        raise ConfigError(f"deployment: cannot import {path!r} ({exc})") from None


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
        **overrides: fields to replace, merged into their sections, e.g. ``http={"port": 8123}``.
    """
    if isinstance(config, str):
        cfg, serve_cfg = load_canary_config(config)
        config = {**to_dict(cfg), **{k: v for k, v in to_dict(serve_cfg).items() if k != "model"}}
    spec = resolve_canary(merge_sections(config or {}, overrides))  # resolved once: @latest names one version
    serve_cfg = load_config(ServeConfig, spec["serve"])
    needs = [(replica_resources(serve_cfg), len(spec["versions"])), (INGRESS_RESOURCES, 1)]
    url = run_app(app_of(spec), serve_cfg, what="canary application", needs=needs)
    return CanaryDeployment(url=url, app_name=serve_cfg.app_name, spec=spec)

