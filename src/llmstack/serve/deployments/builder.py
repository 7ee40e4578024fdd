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
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from llmstack._console import quiet_libraries, verbose
from llmstack._ray import (ReplicaNeeds, check_placement, check_port_free, check_proxy_errors, connect,
                           loopback_host, serve_applications, serve_http_address, start_serve, wait_running,
                           worker_runtime_env)
from llmstack._verbs import Overrides, read_settings
from llmstack.config import SERVE_DEPLOYMENT_DEFAULTS, ServeConfig, load_config, to_dict
from llmstack.errors import ArtifactNotFoundError, ConfigError, ResourceError

QUICKSTART_HINT = "run the quickstart first (`make quickstart`) to train and register it"
DEPLOY_TIMEOUT_S = 300.0  # replicas not healthy by then: deploy() fails, naming what is pending


def resolve_config(args: ServeConfig | dict[str, Any] | str | None) -> ServeConfig:
    """Validate the config and pin registry aliases to versions, so every replica loads the same weights.

    Raises:
        ConfigError: a bad field (all problems listed).
        ArtifactNotFoundError: the model or an adapter is not in the registry (with a quickstart hint).
        ModelLoadError: ``engine.kind: vllm`` asked for a version vLLM cannot load (llmstack-quantized, an adapter).
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
        if cfg.engine.kind == "vllm":  # refused here, not after a replica started vLLM
            from llmstack.serve.engine.vllm import check_servable_version

            check_servable_version(registry, ref)
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
    return app_for(resolve_config(args or {}))


def app_for(cfg: ServeConfig, *, drain_board: Any = None) -> Any:
    """The Serve ``Application`` of an already resolved config (every ref pinned once, by the caller).

    ``drain_board``: the :class:`~llmstack.serve.deployments.drain.DrainBoard` actor whose signal drains the
    ingress replicas (deploy() passes it; SIGTERM to the deploying process sets it)."""
    from llmstack.serve.deployments.ingress import OpenAIIngress
    from llmstack.serve.deployments.server import LLMServer

    config = to_dict(cfg)
    server = LLMServer.options(**server_options(cfg)).bind(config)
    return OpenAIIngress.options(**ingress_options(cfg)).bind(server, config, drain_board)


# The ingress and router are light: they must never be what keeps an app from being placed.
INGRESS_CPUS = 0.1
# a dead replica is noticed within seconds, not Serve's default 10 s (the model deployment's default too)
HEALTH_CHECK_PERIOD_S: float = SERVE_DEPLOYMENT_DEFAULTS["health_check_period_s"]
INGRESS_OPTIONS: dict[str, Any] = {
    "max_ongoing_requests": 100_000,  # the model deployment sheds load, in the OpenAI error shape
    "health_check_period_s": HEALTH_CHECK_PERIOD_S,  # chaos bench: a killed ingress was noticed only after 7.8 s
    "ray_actor_options": {"num_cpus": INGRESS_CPUS},
}


def ingress_replicas(cfg: ServeConfig) -> int:
    """Two ingress replicas when the model runs at least two: a killed one costs ~1 s, not a ~10 s restart."""
    return 2 if cfg.autoscaling.min_replicas >= 2 else 1


def ingress_options(cfg: ServeConfig) -> dict[str, Any]:
    return {**INGRESS_OPTIONS, "num_replicas": ingress_replicas(cfg)}


def server_options(cfg: ServeConfig, *, name: str | None = None, replicas: int | None = None) -> dict[str, Any]:
    """The ``LLMServer.options`` of every model deployment (plain apps and each canary version alike).

    ``replicas`` fixes the replica count instead of autoscaling (canary versions other than the stable one).
    """
    options: dict[str, Any] = {  # the config's `deployment:` (Serve's own options, over llmstack's defaults)
        **cfg.deployment,
        "ray_actor_options": dict(cfg.deployment["ray_actor_options"]),
        "backpressure_config": {"status_code": 503, "retry_after_s": cfg.http.retry_after_s},
    }
    if name is not None:
        options["name"] = name
    if replicas is not None:
        options["num_replicas"] = replicas
    else:
        options["autoscaling_config"] = autoscaling_options(cfg)
    return options



def autoscaling_options(cfg: ServeConfig) -> dict[str, Any]:
    """Serve's ``autoscaling_config``: reactive (queue depth) or predictive (``llmstack.autoscale``).

    The predictive policy reads the app's own /metrics; when no ``metrics_url`` is given it is the
    address this config serves on.
    """
    from llmstack.autoscale import serve_autoscaling_config

    auto = cfg.autoscaling
    if auto.policy == "predictive" and not auto.predictive.metrics_url:
        prefix = "" if cfg.http.route_prefix == "/" else cfg.http.route_prefix.rstrip("/")
        host = "127.0.0.1" if cfg.http.host in ("0.0.0.0", "") else cfg.http.host
        predictive = dataclasses.replace(auto.predictive, metrics_url=f"http://{host}:{cfg.http.port}{prefix}")
        auto = dataclasses.replace(auto, predictive=predictive)
    return serve_autoscaling_config(auto)


@dataclasses.dataclass
class Deployment:
    """A running llmstack Serve application: its base URL, config and a way to stop it.

    Use as a context manager to shut it down on exit. SIGTERM to the process drains it first
    (:mod:`llmstack.serve.deployments.drain`).
    """

    config: ServeConfig
    url: str  # base URL, e.g. http://127.0.0.1:8000 (OpenAI clients use url + "/v1")
    app_name: str
    handle: Any = dataclasses.field(repr=False, default=None)
    board: Any = dataclasses.field(repr=False, default=None)  # the app's DrainBoard actor
    ingress_replicas: int = 1

    @property
    def openai_base_url(self) -> str:
        return self.url.rstrip("/") + "/v1"

    def shutdown(self) -> None:
        """Delete the application (its replicas stop); Serve and Ray keep running."""
        import ray

        from llmstack.serve.deployments import drain

        drain.forget(self)
        if not ray.is_initialized():  # Ray already shut down (a drained process): nothing left to delete
            return
        self.delete_app()
        if self.board is not None:
            try:
                ray.kill(self.board)
            except Exception:  # already gone
                pass
            self.board = None

    def delete_app(self) -> None:
        """Delete the Serve application (a routed app also deletes the versions it added at run time)."""
        from ray import serve

        try:
            serve.delete(self.app_name)
        except Exception:  # already gone
            pass

    def drain(self) -> None:
        """Stop admitting (503 + Retry-After), let live requests finish within the config's
        ``graceful_shutdown_timeout_s`` (streams still running then end with an SSE error event and
        ``[DONE]``), then delete the application."""
        from llmstack.serve.deployments.drain import drain_apps

        drain_apps([self])

    def wait(self) -> None:
        """Block until Ctrl-C or SIGTERM, then drain and shut down: how a CLI keeps the app in the foreground.

        SIGTERM drains every app this process deployed and exits the process with status 0."""
        import time

        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            self.drain()
        finally:
            self.shutdown()

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def deploy(config: ServeConfig | Mapping[str, Any] | str | Path | None = None, *, registry: Any = None,
           overrides: Overrides = (), replace: bool = False, timeout_s: float = DEPLOY_TIMEOUT_S,
           **settings: Any) -> Deployment:
    """Run the llmstack OpenAI-compatible app on Ray Serve and return once it is healthy.

    Args:
        config: a :class:`~llmstack.config.ServeConfig`, a mapping of its fields, or a YAML file path (a
            ``serve run`` file works too); None: defaults.
        registry: a Registry or URL the model resolves in (default ``config.registry``, then ``$LLMSTACK_REGISTRY``).
        overrides: ``key.path=value`` strings (or a mapping of key paths to values) applied on top of ``config``.
        replace: replace a running app of the same name (otherwise that is an error).
        timeout_s: how long to wait for the replicas to become healthy before failing.
        **settings: top-level config keys as values, applied last; a mapping merges into its section:
            ``model="tiny-lm@production"`` (a registry ref or a local directory), ``http={"port": 8123}``,
            ``autoscaling={...}``.

    Returns:
        A :class:`Deployment` with ``.url``, ``.config`` (aliases pinned to versions) and ``.shutdown()``
        (also a context manager).

    Raises:
        ResourceError: the replicas cannot be placed on the cluster, the port is taken by another server, or
            Serve already serves HTTP on this cluster on another port (the message names it).
        ConfigError: an app of that name runs already (and ``replace`` is not set), or another app serves the
            route prefix.
        ModelLoadError: a replica failed to start (the replica's own error message is included).

    Example:
        >>> import llmstack, requests
        >>> with llmstack.deploy(model="tiny-lm@production", http={"port": 8123}) as dep:  # doctest: +SKIP
        ...     requests.post(dep.url + "/v1/completions", json={"prompt": "def "}).json()
    """
    cfg, _ = read_settings("deploy", ServeConfig, config, overrides, settings)
    if registry is not None:
        cfg = dataclasses.replace(cfg, registry=registry if isinstance(registry, str) else registry.url)
    cfg = resolve_config(cfg)  # pinned once: the app and the returned config name the same versions
    from llmstack.serve.deployments import drain

    needs = [(replica_resources(cfg), max(cfg.autoscaling.min_replicas, 1)), (INGRESS_RESOURCES, ingress_replicas(cfg))]
    url, board = run_draining_app(lambda board: app_for(cfg, drain_board=board), cfg, replace=replace,
                                  timeout_s=timeout_s, needs=needs)
    deployment = Deployment(config=cfg, url=url, app_name=cfg.app_name, ingress_replicas=ingress_replicas(cfg),
                            board=board)
    drain.register(deployment)
    return deployment


def run_draining_app(build: Callable[[Any], Any], cfg: ServeConfig, **run_options: Any) -> tuple[str, Any]:
    """:func:`run_app` for an app whose ingress follows a drain board (plain, canary and multi-region apps alike):
    the app's :class:`~llmstack.serve.deployments.drain.DrainBoard` is created once the cluster is connected and
    handed to ``build(board)``, which returns the Application. Returns the base URL and the board; register
    the returned deployment with :func:`llmstack.serve.deployments.drain.register` so SIGTERM drains it."""
    from llmstack.serve.deployments import drain

    boards: list[Any] = []
    url = run_app(lambda: build(boards[0]), cfg, before_start=lambda: boards.append(drain.create_board(cfg.app_name)),
                  **run_options)
    return url, boards[0]



def run_app(app: Any, cfg: ServeConfig, *, replace: bool = False, timeout_s: float = DEPLOY_TIMEOUT_S,
            needs: ReplicaNeeds = (), what: str = "application",
            before_start: Callable[[], Any] | None = None) -> str:  # type: ignore[assignment]
    """Start ``app`` as ``cfg.app_name`` on the connected (or a new local) Ray cluster; returns its base URL.

    ``app`` is an ``Application`` or a function returning one, called after ``before_start`` (which may
    create actors the app is bound to). Fails fast instead of waiting forever: replicas that cannot be placed (``needs``: Ray resources per
    replica and replica counts, see :func:`check_placement`), an HTTP port held by another process or
    Ray cluster, a port other than the one this cluster's Serve already serves on, a route prefix another
    app serves, an app of the same name (unless ``replace``), and a replica that fails to start (its own
    error in the message; the failed app is deleted so a corrected retry can start).
    """
    from ray import serve

    connect(runtime_env=worker_runtime_env())
    if not verbose():  # importing Serve set its logger back to INFO
        quiet_libraries()
    existing = _running_apps()
    if cfg.app_name in existing and not replace:
        raise ConfigError(f"app_name: an application named {cfg.app_name!r} is already running on this cluster; "
                          "shut it down, pick another app_name, or pass replace=True")
    check_placement(needs, freed=cfg.app_name if cfg.app_name in existing else None)
    http = serve_http_address()
    if http is None:  # Serve starts here: the port must be ours to take
        check_port_free(cfg.http.host, cfg.http.port)
        start_serve({"host": cfg.http.host, "port": cfg.http.port})  # with llmstack's proxy middleware
        http = serve_http_address() or (cfg.http.host, cfg.http.port)
    else:
        check_serve_port(cfg.http.port, http[1], cfg.app_name)
        check_proxy_errors(*http)  # a Serve started elsewhere: warns when its proxy lacks llmstack's middleware
    check_route_prefix(cfg.http.route_prefix, cfg.app_name)
    if before_start is not None:  # e.g. the drain board, handed to the ingress replicas
        before_start()
    if not isinstance(app, serve.Application):  # a builder: the app is built now, after before_start
        app = app()
    try:
        serve.run_many([serve.RunTarget(app, name=cfg.app_name, route_prefix=cfg.http.route_prefix)],
                       wait_for_ingress_deployment_creation=False, wait_for_applications_running=False)
    except Exception as exc:  # a prefix taken between the check and the call: the same clear error
        clash = _PREFIX_CLASH.search(str(exc))
        if clash is None:
            raise
        raise _prefix_taken(cfg.http.route_prefix, clash.group(1), cfg.app_name) from None
    try:
        wait_running(cfg.app_name, timeout_s=timeout_s, what=what)
    except BaseException:  # a failed app must not stay registered: the corrected retry would be "already running"
        delete_app(cfg.app_name)
        raise
    host, port = http
    host = loopback_host(host)
    prefix = "" if cfg.http.route_prefix == "/" else cfg.http.route_prefix.rstrip("/")
    return f"http://{host}:{port}{prefix}"


def _running_apps() -> list[str]:
    from ray import serve

    try:
        return list(serve.status().applications)
    except Exception:  # Serve not started on this cluster
        return []


def check_serve_port(asked: int, held: int, app_name: str) -> None:
    """Raise ResourceError when Serve already serves HTTP on this cluster on another port than ``asked``:
    a cluster has one HTTP port for all its apps, so the asked one could not be honoured."""
    if asked != held:
        raise ResourceError(
            f"port: {app_name!r} asks for port {asked}, but Ray Serve already serves HTTP on port {held} of this "
            f"cluster (one port for all its apps, kept apart by route_prefix); deploy with port={held} and its own "
            "route_prefix, or use another Ray cluster for a separate port")


_PREFIX_CLASH = re.compile(r'is being used by application "([^"]+)"')


def check_route_prefix(route_prefix: str, app_name: str) -> None:
    """Raise ConfigError naming both apps when another running app already serves ``route_prefix``."""
    for other, prefix in _route_prefixes().items():
        if other != app_name and prefix == route_prefix:
            raise _prefix_taken(route_prefix, other, app_name)


def _prefix_taken(route_prefix: str, other: str, app_name: str) -> ConfigError:
    return ConfigError(f"route_prefix: {route_prefix!r} is already served by the application {other!r}, so "
                       f"{app_name!r} cannot take it; pick another route_prefix, or shut {other!r} down first")


def _route_prefixes() -> dict[str, str]:
    """The route prefix of each application on this cluster's Serve (empty when Serve is not running)."""
    return {name: app.get("route_prefix") for name, app in serve_applications().items()
            if app.get("route_prefix") is not None and app.get("status") != "DELETING"}


def delete_app(app_name: str) -> None:
    """Delete ``app_name`` (a failed start), keeping the error that led here if deleting fails too."""
    from ray import serve

    try:
        serve.delete(app_name)
    except Exception as exc:  # noqa: BLE001 - the start's own error is the one to report
        import logging

        logging.getLogger(__name__).warning("could not delete the failed application %r: %s", app_name, exc)


def replica_resources(cfg: ServeConfig) -> dict[str, float]:
    """The Ray resources one model replica asks for (as ``server_options`` sets them)."""
    return cfg.replica_resources()


INGRESS_RESOURCES = {"CPU": INGRESS_CPUS}
