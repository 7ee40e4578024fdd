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
from collections.abc import Callable
from typing import Any

from llmstack._console import announce_ray_logs, quiet_libraries, ray_init_options, verbose
from llmstack.config import ServeConfig, load_config, to_dict
from llmstack.errors import ArtifactNotFoundError, ConfigError, ModelLoadError, ResourceError

QUICKSTART_HINT = "run the quickstart first (`make quickstart`) to train and register it"
DEPLOY_TIMEOUT_S = 300.0  # replicas not healthy by then: deploy() fails, naming what is pending


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
HEALTH_CHECK_PERIOD_S = 2.0  # a dead replica is noticed within seconds, not Serve's default 10 s
HEALTH_CHECK_TIMEOUT_S = 10.0
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
    options: dict[str, Any] = {
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "max_queued_requests": cfg.max_queued_requests,
        "backpressure_config": {"status_code": 503, "retry_after_s": cfg.retry_after_s},
        "ray_actor_options": {"num_cpus": cfg.num_cpus, **({"num_gpus": cfg.num_gpus} if cfg.num_gpus else {})},
        "health_check_period_s": HEALTH_CHECK_PERIOD_S,
        "health_check_timeout_s": HEALTH_CHECK_TIMEOUT_S,
        "graceful_shutdown_timeout_s": cfg.graceful_shutdown_timeout_s,
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
    if auto.policy == "predictive" and not auto.metrics_url:
        prefix = "" if cfg.route_prefix == "/" else cfg.route_prefix.rstrip("/")
        host = "127.0.0.1" if cfg.host in ("0.0.0.0", "") else cfg.host
        auto = dataclasses.replace(auto, metrics_url=f"http://{host}:{cfg.port}{prefix}")
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
        from ray import serve

        from llmstack.serve.deployments import drain

        drain.forget(self)
        if not ray.is_initialized():  # Ray already shut down (a drained process): nothing left to delete
            return
        try:
            serve.delete(self.app_name)
        except Exception:  # already gone
            pass
        if self.board is not None:
            try:
                ray.kill(self.board)
            except Exception:  # already gone
                pass
            self.board = None

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


def deploy(config: ServeConfig | dict[str, Any] | str | None = None, *, replace: bool = False,
           timeout_s: float = DEPLOY_TIMEOUT_S, **overrides: Any) -> Deployment:
    """Run the llmstack OpenAI-compatible app on Ray Serve and return once it is healthy.

    Args:
        config: a :class:`~llmstack.config.ServeConfig`, a dict, or a YAML path.
        replace: replace a running app of the same name (otherwise that is an error).
        timeout_s: how long to wait for the replicas to become healthy before failing.
        **overrides: fields to replace, e.g. ``port=8123`` or ``api_key="secret"``.

    Returns:
        A :class:`Deployment` with ``.url`` and ``.shutdown()`` (also a context manager).

    Raises:
        ResourceError: the replicas cannot be placed on the cluster, the port is taken by another server, or
            Serve already serves HTTP on this cluster on another port (the message names it).
        ConfigError: an app of that name runs already (and ``replace`` is not set), or another app serves the
            route prefix.
        ModelLoadError: a replica failed to start (the replica's own error message is included).

    Example:
        >>> with llmstack.deploy({"model": "tiny-lm@production", "port": 8123}) as dep:  # doctest: +SKIP
        ...     requests.post(dep.url + "/v1/completions", json={"prompt": "def "}).json()
    """
    cfg = load_config(ServeConfig, config)
    if overrides:
        cfg = load_config(ServeConfig, {**to_dict(cfg), **overrides})
    cfg = resolve_config(cfg)  # pinned once: the app and the returned config name the same versions
    from llmstack.serve.deployments import drain

    boards: list[Any] = []  # created once the cluster is connected, just before the app starts
    url = run_app(lambda: app_for(cfg, drain_board=boards[0]), cfg, replace=replace, timeout_s=timeout_s,
                  needs=[(replica_resources(cfg), max(cfg.autoscaling.min_replicas, 1)),
                         (INGRESS_RESOURCES, ingress_replicas(cfg))],
                  before_start=lambda: boards.append(drain.create_board(cfg.app_name)))
    deployment = Deployment(config=cfg, url=url, app_name=cfg.app_name, ingress_replicas=ingress_replicas(cfg),
                            board=boards[0])
    drain.register(deployment)
    return deployment



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
    import ray
    from ray import serve

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, **ray_init_options(),
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
        announce_ray_logs()
    if not verbose():  # importing Serve set its logger back to INFO
        quiet_libraries()
    existing = _running_apps()
    if cfg.app_name in existing and not replace:
        raise ConfigError(f"app_name: an application named {cfg.app_name!r} is already running on this cluster; "
                          "shut it down, pick another app_name, or pass replace=True")
    check_placement(needs, freed=cfg.app_name if cfg.app_name in existing else None)
    http = _serve_http()
    if http is None:  # Serve starts here: the port must be ours to take
        check_port_free(cfg.host, cfg.port)
        serve.start(http_options={"host": cfg.host, "port": cfg.port})
        http = _serve_http() or (cfg.host, cfg.port)
    else:
        check_serve_port(cfg.port, http[1], cfg.app_name)
    check_route_prefix(cfg.route_prefix, cfg.app_name)
    if before_start is not None:  # e.g. the drain board, handed to the ingress replicas
        before_start()
    if not isinstance(app, serve.Application):  # a builder: the app is built now, after before_start
        app = app()
    try:
        serve.run_many([serve.RunTarget(app, name=cfg.app_name, route_prefix=cfg.route_prefix)],
                       wait_for_ingress_deployment_creation=False, wait_for_applications_running=False)
    except Exception as exc:  # a prefix taken between the check and the call: the same clear error
        clash = _PREFIX_CLASH.search(str(exc))
        if clash is None:
            raise
        raise _prefix_taken(cfg.route_prefix, clash.group(1), cfg.app_name) from None
    try:
        wait_running(cfg.app_name, timeout_s=timeout_s, what=what)
    except BaseException:  # a failed app must not stay registered: the corrected retry would be "already running"
        delete_app(cfg.app_name)
        raise
    host, port = http
    host = "127.0.0.1" if host in ("0.0.0.0", "", None) else host
    prefix = "" if cfg.route_prefix == "/" else cfg.route_prefix.rstrip("/")
    return f"http://{host}:{port}{prefix}"


def _running_apps() -> list[str]:
    from ray import serve

    try:
        return list(serve.status().applications)
    except Exception:  # Serve not started on this cluster
        return []


def _serve_http() -> tuple[str, int] | None:
    """Host and port of the Serve already running on this cluster (None: not started)."""
    try:
        from ray.serve.context import _get_global_client

        http = _get_global_client(raise_if_no_controller_running=True).http_config
        return http.host, http.port
    except Exception:
        return None


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


def _serve_applications() -> dict[str, Any]:
    """The Serve controller's details of each application on this cluster (empty when Serve is not running)."""
    try:
        from ray.serve.context import _get_global_client

        details = _get_global_client(raise_if_no_controller_running=True).get_serve_details()
    except Exception:
        return {}
    return details.get("applications") or {}


def _route_prefixes() -> dict[str, str]:
    """The route prefix of each application on this cluster's Serve (empty when Serve is not running)."""
    return {name: app.get("route_prefix") for name, app in _serve_applications().items()
            if app.get("route_prefix") is not None and app.get("status") != "DELETING"}


def delete_app(app_name: str) -> None:
    """Delete ``app_name`` (a failed start), keeping the error that led here if deleting fails too."""
    from ray import serve

    try:
        serve.delete(app_name)
    except Exception as exc:  # noqa: BLE001 - the start's own error is the one to report
        import logging

        logging.getLogger(__name__).warning("could not delete the failed application %r: %s", app_name, exc)


def check_port_free(host: str, port: int) -> None:
    """Raise ResourceError when another process (or another Ray cluster's Serve) already listens on the port."""
    import socket

    probe_host = "127.0.0.1" if host in ("0.0.0.0", "", None) else host
    with socket.socket() as sock:
        sock.settimeout(0.5)
        if sock.connect_ex((probe_host, port)) == 0:
            raise ResourceError(f"port {port} on {probe_host} is already in use by another server (another "
                                "deploy() or Ray cluster?); stop it or choose another `port`")


ReplicaNeeds = list[tuple[dict[str, float], int]]  # (Ray resources per replica, replicas)
_RESOURCE_FIELDS = {"CPU": "num_cpus", "GPU": "num_gpus"}


def replica_resources(cfg: ServeConfig) -> dict[str, float]:
    """The Ray resources one model replica asks for (as ``server_options`` sets them)."""
    return {"CPU": cfg.num_cpus, "GPU": cfg.num_gpus}


INGRESS_RESOURCES = {"CPU": INGRESS_CPUS}


def check_placement(needs: ReplicaNeeds, *, freed: str | None = None) -> None:
    """Raise ResourceError naming what was asked and what the cluster has when replicas cannot be placed.

    ``needs`` holds (resources per replica, replicas), keyed by Ray resource (``CPU``, ``GPU``). Each replica
    must fit on one node, and all of them in what is free now plus what the app being replaced
    (``freed``) holds. Every shortfall is named in one message.
    """
    import ray

    needs = [(res, count) for res, count in needs if count > 0 and any(res.values())]
    if not needs:
        return
    asked: dict[str, float] = {}
    for resources, count in needs:
        for name, amount in resources.items():
            if amount:
                asked[name] = asked.get(name, 0.0) + amount * count
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    free, total = ray.available_resources(), ray.cluster_resources()
    released = _app_resources(freed) if freed else {}
    problems = []
    for name, amount in asked.items():
        field = _RESOURCE_FIELDS.get(name, name)
        available = free.get(name, 0.0) + released.get(name, 0.0)
        plan = " + ".join(f"{count} x {res[name]:g}" for res, count in needs if res.get(name))
        if amount > available + 1e-9:
            fix = ("set num_gpus: 0 to serve on CPUs, or add GPU nodes" if name == "GPU"
                   else f"lower {field} or min_replicas, or stop other apps")
            problems.append(f"its replicas ask for {amount:g} {name}s ({field}: {plan}) but the cluster has "
                            f"{available:g} of {total.get(name, 0.0):g} free; {fix}")
            continue
        biggest = max(res.get(name, 0.0) for res, _ in needs)
        largest = max((node.get(name, 0.0) for node in nodes), default=0.0)
        if biggest > largest + 1e-9:
            hint = " (compute threads are set by num_threads, independently)" if name == "CPU" else ""
            problems.append(f"a replica asks for {biggest:g} {name}s ({field}) but the largest node has "
                            f"{largest:g}; lower {field}{hint}")
    if not problems:
        for resources, _ in needs:  # each resource fits somewhere: does the whole replica fit on one node?
            wanted = {k: v for k, v in resources.items() if v}
            if not any(all(node.get(k, 0.0) + 1e-9 >= v for k, v in wanted.items()) for node in nodes):
                shape = ", ".join(f"{v:g} {k}" for k, v in wanted.items())
                problems.append(f"no node has {shape} at once for one replica")
    if problems:
        raise ResourceError("cannot place the app: " + "; ".join(problems))


def _app_resources(app_name: str) -> dict[str, float]:
    """Ray resources held by the replicas of ``app_name`` (what replacing it frees), from the Serve controller."""
    held: dict[str, float] = {}
    app = _serve_applications().get(app_name) or {}  # Serve not running: nothing to free
    for deployment in (app.get("deployments") or {}).values():
        replicas = len(deployment.get("replicas") or [])
        for name, amount in (deployment.get("required_resources") or {}).items():
            held[name] = held.get(name, 0.0) + float(amount) * replicas
    return held


def wait_running(app_name: str, *, timeout_s: float, what: str = "application") -> None:
    """Wait until ``app_name`` is RUNNING; raise with the replica's own error when it fails to deploy."""
    import time

    from ray import serve

    deadline = time.monotonic() + timeout_s
    while True:
        state = serve.status().applications.get(app_name)
        status = str(getattr(state, "status", "")) if state is not None else ""
        if status.endswith("RUNNING"):
            return
        if status.endswith("DEPLOY_FAILED") or status.endswith("UNHEALTHY"):
            raise ModelLoadError(f"the Serve {what} {app_name!r} failed to start: {_failure_message(state)}")
        if time.monotonic() > deadline:
            raise ResourceError(f"the Serve {what} {app_name!r} did not become healthy within {timeout_s:.0f} s: "
                                f"{_failure_message(state) or 'replicas still starting'}")
        time.sleep(0.25)


def _failure_message(state: Any) -> str:
    """The most specific message Serve holds for a failing app: its deployments' messages (the replica's error)."""
    if state is None:
        return ""
    parts = []
    for name, dep in (getattr(state, "deployments", None) or {}).items():
        message = (getattr(dep, "message", "") or "").strip()
        if message:
            parts.append(f"{name}: {_last_error_line(message)}")
    return "; ".join(parts) or (getattr(state, "message", "") or "").strip()


def _last_error_line(message: str) -> str:
    """The user-facing line of a Serve failure message (the exception line at the end of a traceback)."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    for line in reversed(lines):
        if "Error" in line or "Exception" in line:
            return line[:500]
    return (lines[-1] if lines else message)[:500]
