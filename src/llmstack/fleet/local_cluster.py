"""A local autoscaling Ray cluster: Ray's real autoscaler over its fake multi-node provider (nodes are local raylets).

What ``ray.cluster_utils.AutoscalingCluster`` builds (``ray start --head --autoscaling-config`` with
``RAY_FAKE_CLUSTER=1``: the v1 autoscaler over ``FakeMultiNodeProvider``), started directly because that
helper cannot be used as is: its ``start()`` and ``shutdown()`` run ``ray stop --force`` (every Ray process of
the machine, other clusters included), it reads ``fake_multi_node/example.yaml``, which the Ray 2.60 wheel does
not ship, and its provider dials port 6379. The head runs in its own process group (``--block``) on free ports;
the fake nodes are its descendants, so the cluster ends with that group. Read it through the dashboard's state
API (:func:`worker_nodes`, :func:`train_workers`) without ``ray.init``, so it runs beside another cluster.

Example:
    >>> with local_autoscaling_cluster(min_nodes=1, max_nodes=3) as cluster:  # doctest: +SKIP
    ...     len(worker_nodes(cluster.dashboard))
    1
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

NODE_OBJECT_STORE = 100 * 1024 * 1024
NODE_ID_ENV = "RAY_OVERRIDE_NODE_ID_FOR_TESTING"  # the id the fake provider gives a node, in its raylet's environment
CLUSTER_MARKER_ENV = "LLMSTACK_LOCAL_CLUSTER"  # this cluster's temp dir, inherited by every process it starts
_PORT_FLAGS = ("--ray-client-server-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
               "--metrics-export-port", "--runtime-env-agent-port", "--node-manager-port", "--object-manager-port")


@dataclasses.dataclass(frozen=True)
class LocalCluster:
    """A running local autoscaling cluster."""

    gcs_address: str  # RAY_ADDRESS for drivers started by hand
    dashboard: str  # http://127.0.0.1:<port>: the job API and the state API
    temp_dir: str  # the cluster's session files (logs)


def autoscaling_config(gcs_address: str, *, min_nodes: int, max_nodes: int, cpus_per_node: int = 1,
                       idle_timeout_s: float = 6.0) -> dict[str, Any]:
    """A head with no CPUs (drivers and Train controllers only) and ``min_nodes``..``max_nodes`` worker nodes."""
    return {
        "cluster_name": "llmstack-local-autoscaling",
        "max_workers": max_nodes,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_s / 60.0,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "auth": {},
        "docker": {},
        "head_node_type": "ray.head.default",
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            f"cpu{cpus_per_node}": {"resources": {"CPU": cpus_per_node, "object_store_memory": NODE_OBJECT_STORE},
                                    "node_config": {}, "min_workers": min_nodes, "max_workers": max_nodes},
        },
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False, "rsync_exclude": [],
        "rsync_filter": [], "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


def driver_env(**extra: str) -> dict[str, str]:
    """This process's environment for a local cluster's head and the drivers it runs: this llmstack on
    ``PYTHONPATH``, this Python's ``bin`` on ``PATH``, no address or token of another cluster, offline."""
    from llmstack.data.builtin import cache_root

    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env.update({"PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
                "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "LLMSTACK_CACHE": str(cache_root()),
                "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false",
                "HF_HUB_OFFLINE": "1", **extra})
    return env


def state(dashboard: str, resource: str) -> list[dict[str, Any]]:
    """One of the state API's lists (``nodes``, ``actors``, ...)."""
    import requests

    response = requests.get(f"{dashboard}/api/v0/{resource}", params={"limit": 10000, "detail": "false"}, timeout=10)
    response.raise_for_status()
    return response.json()["data"]["result"]["result"]


def worker_nodes(dashboard: str) -> list[dict[str, Any]]:
    """The alive nodes other than the head."""
    return [n for n in state(dashboard, "nodes") if n["state"] == "ALIVE" and not n["is_head_node"]]


def train_workers(dashboard: str) -> list[dict[str, Any]]:
    """The alive Ray Train worker actors."""
    return [a for a in state(dashboard, "actors") if a["class_name"] == "RayTrainWorker" and a["state"] == "ALIVE"]


def kill_raylet(node_id: str, temp_dir: str) -> list[int]:
    """Lose fake node ``node_id`` of the cluster whose session files are under ``temp_dir`` without notice, as a
    machine that dies: SIGKILL its raylet, every process the raylet started and every process carrying the node's
    id and this cluster's marker in its environment (its Ray workers and agents); the pids killed, raylet first.

    Killing the raylet alone leaves its workers running (a data-parallel group goes on stepping over its own
    connections) until Ray's health checks mark the node dead, which a lost machine would not do.
    """
    import psutil

    raylet = None
    for process in psutil.process_iter(["name", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            cmdline = " ".join(process.info["cmdline"] or [])
            if "raylet" not in (process.info["name"] or "") or temp_dir not in cmdline:
                continue
            if node_id in cmdline or process.environ().get(NODE_ID_ENV) == node_id:
                raylet = process
                break
    if raylet is None:
        raise LookupError(f"no raylet process of node {node_id} under {temp_dir}")
    doomed = {raylet.pid: raylet}
    with contextlib.suppress(psutil.Error):
        doomed.update((child.pid, child) for child in raylet.children(recursive=True))
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            environ = process.environ()
            if environ.get(NODE_ID_ENV) == node_id and environ.get(CLUSTER_MARKER_ENV) == temp_dir:
                doomed.setdefault(process.pid, process)
    for process in doomed.values():
        with contextlib.suppress(psutil.Error):
            process.kill()
    return list(doomed)


@contextlib.contextmanager
def local_autoscaling_cluster(*, min_nodes: int, max_nodes: int, cpus_per_node: int = 1, idle_timeout_s: float = 6.0,
                              env: Mapping[str, str] | None = None, startup_timeout_s: float = 120.0,
                              ) -> Iterator[LocalCluster]:
    """Start the head with the autoscaler; yield once ``min_nodes`` worker nodes are up; stop it all on exit.

    ``env`` is the head's environment (its drivers, Ray Jobs included, inherit it), default this process's.
    """
    import psutil
    from ray._private.services import get_node_ip_address

    from llmstack._ray import free_ports

    bin_dir = Path(sys.executable).parent
    gcs_port, dashboard_port, *spare = free_ports(2 + len(_PORT_FLAGS))
    gcs_address = f"{get_node_ip_address()}:{gcs_port}"
    temp_dir = tempfile.mkdtemp(prefix="rayauto-", dir="/tmp")  # short: Ray's socket paths have a length limit
    config_path = Path(temp_dir) / "autoscaling.json"
    config_path.write_text(json.dumps(autoscaling_config(gcs_address, min_nodes=min_nodes, max_nodes=max_nodes,
                                                         cpus_per_node=cpus_per_node, idle_timeout_s=idle_timeout_s)))
    ports = [str(x) for pair in zip(_PORT_FLAGS, spare) for x in pair]
    head_env = dict(env if env is not None else os.environ)
    head_env.update({"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", CLUSTER_MARKER_ENV: temp_dir,
                     "PATH": f"{bin_dir}{os.pathsep}{head_env.get('PATH', '')}"})
    log = open(os.path.join(temp_dir, "head.log"), "wb")
    head = subprocess.Popen(
        [str(bin_dir / "ray"), "start", "--head", "--block", f"--autoscaling-config={config_path}", "--num-cpus", "0",
         "--object-store-memory", str(NODE_OBJECT_STORE), "--port", str(gcs_port), "--dashboard-port",
         str(dashboard_port), "--include-dashboard", "true", "--temp-dir", temp_dir, "--disable-usage-stats", *ports],
        env=head_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    try:
        deadline = time.monotonic() + startup_timeout_s
        while True:
            if head.poll() is not None:
                raise RuntimeError(f"the Ray head exited (rc {head.returncode}); see {temp_dir}/head.log")
            with contextlib.suppress(Exception):
                if len(worker_nodes(dashboard)) >= max(min_nodes, 0) and (min_nodes or state(dashboard, "nodes")):
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {min_nodes} worker node(s) from the autoscaler within {startup_timeout_s:.0f} s")
            time.sleep(0.5)
        yield LocalCluster(gcs_address, dashboard, temp_dir)
    finally:
        group = list(psutil.Process(head.pid).children(recursive=True)) if head.poll() is None else []
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGTERM)  # --block: the head stops what it started
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.wait(timeout=20)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)
        for process in group:  # descendants that left the group (none expected): by their ids
            with contextlib.suppress(psutil.Error):
                process.kill()
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


__all__ = ["LocalCluster", "autoscaling_config", "driver_env", "kill_raylet", "local_autoscaling_cluster", "state",
           "train_workers", "worker_nodes"]
