"""TEST/BENCHMARK ONLY: a multi-node local Ray cluster standing in for regions, and HTTP helpers to watch it.

Used by the multi-region integration driver (tests/integration/regions) and by benchmarks/regions_bench.py.
Each region is one or more Ray nodes holding ``region:<name>``; killing a region SIGKILLs its nodes' raylets
(then reaps the rest), as a lost zone would. Never used by the library itself.

Run only in a process of its own: it starts a cluster (``ray.cluster_utils.Cluster``) and connects to it,
and must set ``RAY_TMPDIR`` before Ray is imported so nothing it writes lands in other clusters' /tmp/ray.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

MB = 1024 * 1024


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RegionCluster:
    """Head (router, Serve controller and proxy) plus ``nodes`` per region, each node ``region_cpus`` CPUs."""

    def __init__(self, regions: list[str], *, temp_dir: str, head_cpus: float = 1, region_cpus: float = 1,
                 object_store_mb: int = 100) -> None:
        assert os.environ.get("RAY_TMPDIR") == temp_dir, "set RAY_TMPDIR to temp_dir before importing ray"
        self.regions = regions
        self.temp_dir = os.path.join(temp_dir, "ray")  # where Ray would put it under RAY_TMPDIR
        os.makedirs(self.temp_dir, exist_ok=True)
        self.region_cpus = region_cpus
        self.object_store = object_store_mb * MB
        self.nodes: dict[str, list[Any]] = {}
        self.cluster: Any = None
        self.http_port = free_port()
        self.head_cpus = head_cpus

    def start(self) -> RegionCluster:
        from ray.cluster_utils import Cluster

        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": self.head_cpus, "object_store_memory": self.object_store, "gcs_server_port": free_port(),
            "include_dashboard": False, "dashboard_agent_listen_port": free_port(), "temp_dir": self.temp_dir,
            # a node whose raylet is gone is declared dead within ~3 s, not Ray's default ~30 s
            "_system_config": {"health_check_period_ms": 1000, "health_check_timeout_ms": 1000,
                               "health_check_failure_threshold": 3, "health_check_initial_delay_ms": 1000}})
        for name in self.regions:
            self.add(name)
        from llmstack._ray import connect, start_serve

        connect(self.cluster.address, runtime_env={"env_vars": {
            "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}})
        start_serve({"host": "127.0.0.1", "port": self.http_port}, proxy_location="HeadOnly")
        return self

    def add(self, region: str) -> Any:
        node = self.cluster.add_node(num_cpus=self.region_cpus, object_store_memory=self.object_store,
                                     resources={f"region:{region}": 1})
        self.nodes.setdefault(region, []).append(node)
        return node

    def kill(self, region: str) -> float:
        """SIGKILL the raylet of each of the region's nodes (a lost zone: no goodbye to the GCS), then reap the
        node's other processes; returns the wall time of the first SIGKILL."""
        import signal

        from ray._private import ray_constants

        nodes = self.nodes.pop(region, [])
        at = time.time()
        for node in nodes:
            os.kill(node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid, signal.SIGKILL)
        for node in nodes:  # the raylet is already dead: this SIGKILLs what is left (log monitor, ...)
            self.cluster.remove_node(node, allow_graceful=False)
        return at

    def shutdown(self) -> None:
        import ray

        try:
            from ray import serve

            serve.shutdown()
        except Exception:
            pass
        try:
            ray.shutdown()
        finally:
            if self.cluster is not None:
                self.cluster.shutdown()


def replica_nodes(app_name: str) -> dict[str, list[str]]:
    """Deployment name -> node ids of its live replica actors (from the GCS actor table; no dashboard needed)."""
    from ray._private import state

    out: dict[str, list[str]] = {}
    for info in state.actors().values():
        name = info.get("Name") or ""
        if info.get("State") != "ALIVE" or not name.startswith(f"SERVE_REPLICA::{app_name}#"):
            continue
        deployment = name.split("#")[1]
        out.setdefault(deployment, []).append(info["Address"]["NodeID"])
    return out


def node_resources() -> dict[str, dict[str, float]]:
    import ray

    return {n["NodeID"]: n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")}


def get_json(url: str, path: str) -> dict[str, Any]:
    import requests

    return requests.get(url + path, timeout=30).json()


def post_json(url: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    import requests

    r = requests.post(url + path, data=json.dumps(body), timeout=30)
    return {"status_code": r.status_code, **r.json()}


def wait_for(predicate: Any, timeout: float, period: float = 0.25) -> float | None:
    """Seconds until ``predicate()`` holds (None: not within ``timeout``)."""
    start = time.time()
    while time.time() - start < timeout:
        try:
            if predicate():
                return time.time() - start
        except Exception:
            pass
        time.sleep(period)
    return None


def replica_views(url: str, want: int, timeout: float) -> dict[str, dict[str, Any]]:
    """Router replica id -> its /regions status, from repeated GETs (the proxy picks a replica per request)
    until ``want`` replicas have answered or ``timeout`` passed."""
    views: dict[str, dict[str, Any]] = {}
    wait_for(lambda: views.update({(s := get_json(url, "/regions"))["replica"]: s}) or len(views) >= want,
             timeout=timeout, period=0.05)
    return views
