"""The one door to Ray's process-level machinery: connecting, Serve's controller, ports, placement, polling.

Owns: ``ray.init`` (:func:`connect` to a cluster, :func:`start_local` for a bounded one), every use of a
private Serve API (:func:`serve_client` and what reads through it, each checked against
:data:`CHECKED_RAY_VERSION`), probing HTTP ports, the placement arithmetic that says whether replicas
fit a cluster, and the polling loop that waits for a Serve application. Everything else in llmstack
reaches these through here, so a Ray upgrade is checked in one file.

May import: the standard library, ``llmstack.errors`` and ``llmstack._console``; Ray lazily, inside
functions (``import llmstack`` must not import Ray). The pure parts (:func:`resolve_address`,
:func:`placement_problems`, :func:`held_resources`) take plain data and are tested without Ray.

Token authentication is Ray's own: with ``RAY_AUTH_MODE=token`` (or a ``~/.ray/auth_token`` that an
earlier local cluster left behind) ``ray.init`` reads the token itself; nothing here passes or stores one.

Example:
    >>> from llmstack import _ray
    >>> _ray.resolve_address(None, require_running=True, environ={})
    'auto'
    >>> _ray.connect(runtime_env=_ray.worker_runtime_env())  # doctest: +SKIP
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from llmstack._console import VERBOSE_ENV, quiet_libraries, ray_init_options, verbose
from llmstack.errors import ModelLoadError, ResourceError

#: The Ray release the private Serve calls below were read against; re-check them when Ray moves on.
CHECKED_RAY_VERSION = "2.60.0"
#: Environment every llmstack worker and replica runs with.
WORKER_ENV: dict[str, str] = {"TOKENIZERS_PARALLELISM": "false"}
#: Object store of a local cluster started by :func:`start_local` when the caller names no other size.
LOCAL_OBJECT_STORE_BYTES = 512 * 1024 * 1024
ADDRESS_ENV = "RAY_ADDRESS"
#: Environment variable naming the function whose ASGI middlewares Ray Serve's HTTP proxy runs (read by the proxy).
PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
#: llmstack's proxy middleware (:mod:`llmstack.serve.http.proxy_errors`): every error the proxy writes itself in
#: the OpenAI shape, and a request whose ingress replica was lost replayed.
PROXY_CALLBACK = "llmstack.serve.http.proxy_errors:proxy_middlewares"
#: Answered by that middleware itself: tells whether a running Serve has it.
PROXY_PROBE_PATH = "/-/llmstack/proxy-errors"
_announced = False

T = TypeVar("T")


# --------------------------------------------------------------------------- connecting


def resolve_address(address: str | None = None, *, require_running: bool = False,
                    environ: Mapping[str, str] | None = None) -> str | None:
    """The address ``ray.init`` gets: ``address``, else ``RAY_ADDRESS``, else ``"auto"`` when a running
    cluster is required (Ray then fails instead of starting one), else None (Ray finds the latest local
    cluster or starts one). Blank values count as unset.

    Example:
        >>> resolve_address("ray://head:10001", environ={"RAY_ADDRESS": "other:6379"})
        'ray://head:10001'
        >>> resolve_address(None, environ={"RAY_ADDRESS": " 10.0.0.2:6379 "})
        '10.0.0.2:6379'
        >>> resolve_address(None, environ={}) is None
        True
    """
    env = os.environ if environ is None else environ
    for candidate in (address, env.get(ADDRESS_ENV)):
        if candidate is not None and candidate.strip():
            return candidate.strip()
    return "auto" if require_running else None


def worker_runtime_env(extra_env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """A ``runtime_env`` whose ``env_vars`` are :data:`WORKER_ENV` plus ``extra_env`` (which wins)."""
    return {"env_vars": {**WORKER_ENV, **(extra_env or {})}}


def is_connected() -> bool:
    """True when this process has Ray initialised (without importing Ray when it has not been)."""
    import sys

    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def connect(address: str | None = None, *, runtime_env: dict[str, Any] | None = None,
            require_running: bool = False) -> bool:
    """Connect this process to Ray unless it already is; returns True when it connected now.

    The address is :func:`resolve_address`'s. Ray's logs go where :func:`llmstack._console.ray_init_options`
    says (the console only with ``--verbose``), and where they went is printed once.

    Raises:
        ResourceError: ``require_running`` and no cluster answers at the address (the message names it).
    """
    import ray

    if ray.is_initialized():
        return False
    target = resolve_address(address, require_running=require_running)
    options: dict[str, Any] = dict(ray_init_options())
    if runtime_env is not None:
        options["runtime_env"] = runtime_env
    try:
        ray.init(address=target, **options)
    except ConnectionError as exc:
        raise ResourceError(f"no Ray cluster answers at {target!r} ({exc}); start one with `ray start --head`, "
                            f"or set {ADDRESS_ENV} to a running cluster's address") from None
    announce_ray_logs()
    return True


def started_here() -> bool:
    """True when this process's ``ray.init`` started the cluster (it then ends with this process)."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    return bool(ray.is_initialized() and node is not None and getattr(node, "head", False))


def start_local(num_cpus: int, object_store_bytes: int = LOCAL_OBJECT_STORE_BYTES, *,
                runtime_env: dict[str, Any] | None = None, include_dashboard: bool = True) -> None:
    """Start a bounded local Ray cluster for this process (``num_cpus`` CPUs, an object store of
    ``object_store_bytes``). The dashboard is on by default: it serves the state API that Ray Train's
    placement-group cleaner polls."""
    import ray

    options: dict[str, Any] = dict(ray_init_options())
    if runtime_env is not None:
        options["runtime_env"] = runtime_env
    ray.init(num_cpus=num_cpus, object_store_memory=object_store_bytes, include_dashboard=include_dashboard,
             **options)
    announce_ray_logs()


def announce_ray_logs() -> None:
    """Once per process, when quiet: say where Ray's logs went (this session's log folder)."""
    global _announced
    if _announced or verbose():
        return
    _announced = True
    quiet_libraries()
    try:
        import ray

        # Private: ray._private.worker.global_worker.node (Ray CHECKED_RAY_VERSION), the only way to the log dir.
        node = ray._private.worker.global_worker.node  # noqa: SLF001
        where = node.get_logs_dir_path() if node is not None else None
    except Exception:  # noqa: BLE001 - a remote cluster: its logs are on its head node
        where = None
    where = where or "the Ray head node's session directory (/tmp/ray/session_latest/logs)"
    print(f"llmstack: Ray and Serve logs go to {where} (--verbose or {VERBOSE_ENV}=1 prints them here)",
          file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- Serve's controller (private API)


def serve_client() -> Any | None:
    """Serve's controller client on the connected cluster, or None when Serve is not running there.

    Private API: ``ray.serve.context._get_global_client`` as of Ray :data:`CHECKED_RAY_VERSION`.
    """
    try:
        from ray.serve.context import _get_global_client

        return _get_global_client(raise_if_no_controller_running=True)
    except Exception:  # noqa: BLE001 - Serve not started (RayServeException), or Ray not connected
        return None


def serve_controller_options(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``controller_options`` for ``serve.start``: the controller's env carries :data:`PROXY_CALLBACK_ENV`, and the
    proxies it starts inherit it. A callback already named in this process's environment is kept.

    Example:
        >>> serve_controller_options(environ={})["runtime_env"]["env_vars"]
        {'RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH': 'llmstack.serve.http.proxy_errors:proxy_middlewares'}
    """
    env = os.environ if environ is None else environ
    return {"runtime_env": {"env_vars": {PROXY_CALLBACK_ENV: env.get(PROXY_CALLBACK_ENV) or PROXY_CALLBACK}}}


def start_serve(http_options: dict[str, Any], **options: Any) -> None:
    """Start Serve on the connected cluster with llmstack's proxy middleware (see :data:`PROXY_CALLBACK`);
    ``options`` go to ``serve.start`` as they are (e.g. ``proxy_location``)."""
    from ray import serve

    serve.start(http_options=http_options, controller_options=serve_controller_options(), **options)


_proxy_checked: set[tuple[str, int]] = set()


def check_proxy_errors(host: str | None, port: int, *, timeout_s: float = 2.0) -> bool | None:
    """Whether the Serve answering on ``host:port`` runs llmstack's proxy middleware (asked over HTTP at
    :data:`PROXY_PROBE_PATH`); None when nothing answers. Without it, warns once per address: errors Ray's
    proxy writes itself then reach clients as plain text."""
    import urllib.error
    import urllib.request
    import warnings

    address = (loopback_host(host), port)
    url = f"http://{address[0]}:{port}{PROXY_PROBE_PATH}"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 - our own loopback URL
            installed = PROXY_CALLBACK in response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError:
        installed = False
    except (OSError, ValueError):
        return None
    if not installed and address not in _proxy_checked:
        _proxy_checked.add(address)
        warnings.warn(f"Ray Serve on port {port} runs without llmstack's proxy middleware, so errors its HTTP "
                      "proxy writes itself (a lost ingress replica, load shedding) reach clients as plain text and "
                      "a request on a lost ingress replica is not replayed. Start the cluster with "
                      f"`{PROXY_CALLBACK_ENV}={PROXY_CALLBACK} ray start --head`, or let llmstack start Serve "
                      "(serve.shutdown() first)", stacklevel=2)
    return installed


def serve_http_address() -> tuple[str, int] | None:
    """Host and port Serve's HTTP proxies really listen on (None: Serve not running on this cluster)."""
    client = serve_client()
    if client is None:
        return None
    try:
        http = client.http_config  # private: ServeControllerClient.http_config (Ray CHECKED_RAY_VERSION)
        return str(http.host), int(http.port)
    except Exception:  # noqa: BLE001 - controller gone between the two calls
        return None


def serve_applications() -> dict[str, Any]:
    """The Serve controller's details of each application on this cluster (empty when Serve is not running)."""
    client = serve_client()
    if client is None:
        return {}
    try:
        details = client.get_serve_details()  # private: ServeControllerClient (Ray CHECKED_RAY_VERSION)
    except Exception:  # noqa: BLE001 - controller gone between the two calls
        return {}
    return details.get("applications") or {}


def held_resources(application: Mapping[str, Any]) -> dict[str, float]:
    """Ray resources held by the replicas of one application, from its Serve details (pure).

    Example:
        >>> held_resources({"deployments": {"M": {"replicas": [{}, {}], "required_resources": {"CPU": 0.5}}}})
        {'CPU': 1.0}
    """
    held: dict[str, float] = {}
    for deployment in (application.get("deployments") or {}).values():
        replicas = len(deployment.get("replicas") or [])
        for name, amount in (deployment.get("required_resources") or {}).items():
            held[name] = held.get(name, 0.0) + float(amount) * replicas
    return held


def app_resources(app_name: str) -> dict[str, float]:
    """Ray resources held by the replicas of ``app_name`` on this cluster (what replacing it frees)."""
    return held_resources(serve_applications().get(app_name) or {})


# --------------------------------------------------------------------------- ports


def loopback_host(host: str | None) -> str:
    """The host to reach a server bound to ``host`` from this machine (wildcards become 127.0.0.1)."""
    return "127.0.0.1" if host in ("0.0.0.0", "", None) else str(host)


def port_in_use(host: str | None, port: int, *, timeout_s: float = 0.5) -> bool:
    """True when something accepts TCP connections on ``host:port``."""
    with socket.socket() as sock:
        sock.settimeout(timeout_s)
        return sock.connect_ex((loopback_host(host), port)) == 0


def check_port_free(host: str | None, port: int) -> None:
    """Raise ResourceError when another process (or another Ray cluster's Serve) already listens on the port."""
    if port_in_use(host, port):
        raise ResourceError(f"port {port} on {loopback_host(host)} is already in use by another server (another "
                            "deploy() or Ray cluster?); stop it or choose another `http.port`")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port the OS reports free on ``host`` now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct TCP ports the OS reports free on ``host`` now (e.g. for a `ray start` of its own)."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port(host)
        if port not in ports:
            ports.append(port)
    return ports


# --------------------------------------------------------------------------- placement

ReplicaNeeds = Sequence[tuple[Mapping[str, float], int]]  # (Ray resources per replica, replicas)
_RESOURCE_FIELDS = {"CPU": "deployment.ray_actor_options.num_cpus", "GPU": "deployment.ray_actor_options.num_gpus"}
_SLACK = 1e-9


def placement_problems(needs: ReplicaNeeds, *, nodes: Sequence[Mapping[str, float]], free: Mapping[str, float],
                       total: Mapping[str, float], released: Mapping[str, float] | None = None) -> list[str]:
    """Why replicas cannot be placed on a cluster (empty: they fit); pure arithmetic over plain dicts.

    ``needs`` holds (resources per replica, replicas) keyed by Ray resource (``CPU``, ``GPU``); ``nodes``
    each live node's total resources; ``free`` and ``total`` the cluster's; ``released`` what an app
    being replaced holds (it counts as free). All of them must fit in what is free, and each replica
    on one node.

    Example:
        >>> problems = placement_problems([({"CPU": 2.0}, 2)], nodes=[{"CPU": 4.0}], free={"CPU": 3.0},
        ...                               total={"CPU": 4.0})
        >>> problems[0].split(";")[0]
        'its replicas ask for 4 CPUs (deployment.ray_actor_options.num_cpus: 2 x 2) but the cluster has 3 of 4 free'
    """
    needs = [(res, count) for res, count in needs if count > 0 and any(res.values())]
    if not needs:
        return []
    released = released or {}
    asked: dict[str, float] = {}
    for resources, count in needs:
        for name, amount in resources.items():
            if amount:
                asked[name] = asked.get(name, 0.0) + amount * count
    problems = []
    for name, amount in asked.items():
        field = _RESOURCE_FIELDS.get(name, name)
        available = free.get(name, 0.0) + released.get(name, 0.0)
        plan = " + ".join(f"{count} x {res[name]:g}" for res, count in needs if res.get(name))
        if amount > available + _SLACK:
            fix = (f"set {field}: 0 to serve on CPUs, or add GPU nodes" if name == "GPU"
                   else f"lower {field} or autoscaling.min_replicas, or stop other apps")
            problems.append(f"its replicas ask for {amount:g} {name}s ({field}: {plan}) but the cluster has "
                            f"{available:g} of {total.get(name, 0.0):g} free; {fix}")
            continue
        biggest = max(res.get(name, 0.0) for res, _ in needs)
        largest = max((node.get(name, 0.0) for node in nodes), default=0.0)
        if biggest > largest + _SLACK:
            hint = " (compute threads are set by engine.num_threads, independently)" if name == "CPU" else ""
            problems.append(f"a replica asks for {biggest:g} {name}s ({field}) but the largest node has "
                            f"{largest:g}; lower {field}{hint}")
    if not problems:
        for resources, _ in needs:  # each resource fits somewhere: does the whole replica fit on one node?
            wanted = {k: v for k, v in resources.items() if v}
            if not any(all(node.get(k, 0.0) + _SLACK >= v for k, v in wanted.items()) for node in nodes):
                shape = ", ".join(f"{v:g} {k}" for k, v in wanted.items())
                problems.append(f"no node has {shape} at once for one replica")
    return problems


def check_placement(needs: ReplicaNeeds, *, freed: str | None = None) -> None:
    """Raise ResourceError naming what was asked and what the connected cluster has when replicas cannot be
    placed (:func:`placement_problems` on the live cluster; ``freed``: an app being replaced)."""
    if not [1 for res, count in needs if count > 0 and any(res.values())]:
        return
    import ray

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    problems = placement_problems(needs, nodes=nodes, free=ray.available_resources(),
                                  total=ray.cluster_resources(), released=app_resources(freed) if freed else None)
    if problems:
        raise ResourceError("cannot place the app: " + "; ".join(problems))


# --------------------------------------------------------------------------- polling


def poll(probe: Callable[[], T | None], *, timeout_s: float, interval_s: float = 0.25) -> T | None:
    """Call ``probe`` until it returns something other than None (returned) or ``timeout_s`` passes (None).

    ``probe`` runs at least once, and once more after the deadline, so a slow last step still counts.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        result = probe()
        if result is not None:
            return result
        if time.monotonic() > deadline:
            return None
        time.sleep(interval_s)


def wait_running(app_name: str, *, timeout_s: float, what: str = "application") -> None:
    """Wait until Serve reports ``app_name`` RUNNING; raise with the replica's own error when it fails to deploy.

    Raises:
        ModelLoadError: the app failed to deploy or turned unhealthy (the deployments' messages included).
        ResourceError: still not healthy after ``timeout_s`` (what is pending is named).
    """
    from ray import serve

    last: list[Any] = [None]

    def settled() -> str | None:
        state = last[0] = serve.status().applications.get(app_name)
        status = str(getattr(state, "status", "")) if state is not None else ""
        return next((end for end in ("RUNNING", "DEPLOY_FAILED", "UNHEALTHY") if status.endswith(end)), None)

    outcome = poll(settled, timeout_s=timeout_s)
    if outcome == "RUNNING":
        return
    if outcome is not None:
        raise ModelLoadError(f"the Serve {what} {app_name!r} failed to start: {failure_message(last[0])}")
    raise ResourceError(f"the Serve {what} {app_name!r} did not become healthy within {timeout_s:.0f} s: "
                        f"{failure_message(last[0]) or 'replicas still starting'}")


def failure_message(state: Any) -> str:
    """The most specific message Serve holds for a failing app: its deployments' messages (the replica's error)."""
    if state is None:
        return ""
    parts = []
    for name, dep in (getattr(state, "deployments", None) or {}).items():
        message = (getattr(dep, "message", "") or "").strip()
        if message:
            parts.append(f"{name}: {last_error_line(message)}")
    return "; ".join(parts) or (getattr(state, "message", "") or "").strip()


def last_error_line(message: str) -> str:
    """The user-facing line of a Serve failure message (the exception line at the end of a traceback)."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    for line in reversed(lines):
        if "Error" in line or "Exception" in line:
            return line[:500]
    return (lines[-1] if lines else message)[:500]


__all__ = ["CHECKED_RAY_VERSION", "LOCAL_OBJECT_STORE_BYTES", "PROXY_CALLBACK", "PROXY_CALLBACK_ENV",
           "PROXY_PROBE_PATH", "WORKER_ENV", "ReplicaNeeds", "announce_ray_logs", "app_resources", "check_placement",
           "check_port_free", "check_proxy_errors", "connect", "failure_message", "free_port",
           "held_resources", "is_connected", "last_error_line", "loopback_host", "placement_problems", "poll",
           "port_in_use", "resolve_address", "serve_applications", "serve_client", "serve_controller_options",
           "serve_http_address", "start_local", "start_serve", "wait_running", "worker_runtime_env"]
