"""Assemble the Serve application: ``build_app`` (the YAML ``import_path``) and ``deploy`` (the Python entry).

Topology::

    HTTP ─▶ OpenAIIngress (FastAPI: auth, validation, SSE, metrics)
               │  engine protocol over a DeploymentHandle
               ▼
            LLMServer ×N (autoscaled on queue depth; @serve.batch; @serve.multiplexed adapters)

A router for canary releases slots in between: anything with the ``LLMServer`` methods can be the
ingress's backend.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from llmstack.config import ServeConfig, load_config, to_dict
from llmstack.errors import ArtifactNotFoundError, ConfigError, ModelLoadError

QUICKSTART_HINT = "run the quickstart first (`make quickstart`) to train and register it"


def resolve_config(args: ServeConfig | dict[str, Any] | str | None) -> ServeConfig:
    """Validate the config and pin registry aliases to versions, so every replica loads the same weights.

    Raises:
        ConfigError: a bad field (all problems listed).
        ArtifactNotFoundError: the model or an adapter is not in the registry (with a quickstart hint).
    """
    from llmstack.registry import ArtifactRef, Registry

    cfg = load_config(ServeConfig, args)
    registry = Registry(cfg.registry) if cfg.registry else Registry()
    cfg = dataclasses.replace(cfg, registry=registry.url)
    source = cfg.model
    if not os.path.isdir(os.path.expanduser(source)):
        if not ArtifactRef.looks_like(source):
            raise ConfigError(f"model: {source!r} is neither a registry reference (name, name@vN, name@alias) "
                              "nor a local model directory")
        try:
            ref = registry.resolve(source)
        except ArtifactNotFoundError:
            raise ArtifactNotFoundError(
                f"model {source!r} is not in the registry at {registry.url}; {QUICKSTART_HINT}, "
                "or point `model` (and `registry` / LLMSTACK_REGISTRY) at a registered model") from None
        if str(ref) != source:
            cfg = dataclasses.replace(cfg, model=str(ref), model_aliases=[*cfg.model_aliases, source])
    pinned = []
    for entry in cfg.adapters:
        served_id, sep, target = entry.partition("=")
        if not sep:
            served_id, target = "", entry
        if "://" in target or os.path.isdir(os.path.expanduser(target)) or not ArtifactRef.looks_like(target):
            pinned.append(entry)
            continue
        try:
            ref = registry.resolve(target)
        except ArtifactNotFoundError:
            raise ArtifactNotFoundError(f"adapter {target!r} is not in the registry at {registry.url}") from None
        # Keep the served id the adapter's name even though the source is now pinned.
        pinned.append(f"{served_id or ref.name}={ref}")
    return dataclasses.replace(cfg, adapters=pinned)


def build_app(args: dict[str, Any] | None = None) -> Any:
    """The Serve ``Application`` for a :class:`~llmstack.config.ServeConfig` given as a dict.

    This is the ``import_path`` target of ``serve_configs/*.yaml`` (``llmstack.serve:build_app``)
    and what :func:`deploy` runs.

    Example:
        >>> app = build_app({"model": "tiny-lm@production"})  # doctest: +SKIP
        >>> serve.run(app)  # doctest: +SKIP
    """
    from llmstack.autoscale import serve_autoscaling_config
    from llmstack.serve.ingress import OpenAIIngress
    from llmstack.serve.server import LLMServer

    cfg = resolve_config(args or {})
    config = to_dict(cfg)
    server = LLMServer.options(
        autoscaling_config=serve_autoscaling_config(cfg.autoscaling),
        max_ongoing_requests=cfg.max_ongoing_requests,
        max_queued_requests=cfg.max_queued_requests,
        backpressure_config={"status_code": 503, "retry_after_s": cfg.retry_after_s},
        ray_actor_options={"num_cpus": cfg.num_cpus},
        health_check_period_s=10,
        graceful_shutdown_timeout_s=5,
    ).bind(config)
    ingress = OpenAIIngress.options(
        max_ongoing_requests=100_000,  # the model deployment sheds load, in the OpenAI error shape
        ray_actor_options={"num_cpus": 0.1},
    ).bind(server, config)
    return ingress


@dataclasses.dataclass
class Deployment:
    """A running llmstack Serve application: its base URL, config and a way to stop it.

    Use as a context manager to shut it down on exit.
    """

    config: ServeConfig
    url: str  # base URL, e.g. http://127.0.0.1:8000 (OpenAI clients use url + "/v1")
    app_name: str
    handle: Any = dataclasses.field(repr=False, default=None)

    @property
    def openai_base_url(self) -> str:
        return self.url.rstrip("/") + "/v1"

    def shutdown(self) -> None:
        """Delete the application (its replicas stop); Serve and Ray keep running."""
        from ray import serve

        try:
            serve.delete(self.app_name)
        except Exception:  # already gone
            pass

    def wait(self) -> None:
        """Block until interrupted (Ctrl-C), then shut down: how a CLI keeps the app in the foreground."""
        import time

        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
        finally:
            self.shutdown()

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def deploy(config: ServeConfig | dict[str, Any] | str | None = None, **overrides: Any) -> Deployment:
    """Run the llmstack OpenAI-compatible app on Ray Serve and return once it is healthy.

    Args:
        config: a :class:`~llmstack.config.ServeConfig`, a dict, or a YAML path.
        **overrides: fields to replace, e.g. ``port=8123`` or ``api_key="secret"``.

    Returns:
        A :class:`Deployment` with ``.url`` and ``.shutdown()`` (also a context manager).

    Example:
        >>> with llmstack.deploy({"model": "tiny-lm@production", "port": 8123}) as dep:  # doctest: +SKIP
        ...     requests.post(dep.url + "/v1/completions", json={"prompt": "def "}).json()
    """
    import ray
    from ray import serve

    cfg = load_config(ServeConfig, config)
    if overrides:
        cfg = load_config(ServeConfig, {**to_dict(cfg), **overrides})
    app = build_app(to_dict(cfg))
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, log_to_driver=False,
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    try:
        handle = serve.run(app, name=cfg.app_name, route_prefix=cfg.route_prefix)
    except Exception as exc:
        raise ModelLoadError(f"the Serve application {cfg.app_name!r} failed to start: {exc}") from None
    host, port = cfg.host, cfg.port
    try:  # Serve may already run on another address: report the real one
        from ray.serve.context import _get_global_client

        http = _get_global_client().http_config
        host, port = http.host, http.port
    except Exception:
        pass
    host = "127.0.0.1" if host in ("0.0.0.0", "", None) else host
    prefix = "" if cfg.route_prefix == "/" else cfg.route_prefix.rstrip("/")
    return Deployment(config=cfg, url=f"http://{host}:{port}{prefix}", app_name=cfg.app_name, handle=handle)
