"""The Ray cluster a benchmark runs on: a bounded local one (and Serve on a free port), or the multi-node
region cluster of ``llmstack.serve._region_cluster``.

Run a benchmark that starts Ray under the shared lock: ``flock /tmp/llmstack-ray.lock timeout 600 python ...``.
"""

from __future__ import annotations

from typing import Any

from harness.env import WORKER_ENV, free_port
from llmstack.serve._region_cluster import RegionCluster, get_json, post_json, replica_views, wait_for

__all__ = ["RegionCluster", "get_json", "post_json", "replica_views", "start_ray", "start_serve", "wait_for"]


def start_ray(num_cpus: int = 4, *, object_store_memory: int | None = None, include_dashboard: bool = False,
              worker_env: dict[str, str] | None = WORKER_ENV, **init_kwargs: Any) -> Any:
    """``ray.init`` of a local cluster of ``num_cpus`` CPUs, quiet (no driver log echo), its workers with
    ``worker_env`` (default: one OMP thread, no tokenizer threads; None: no runtime env)."""
    import ray

    options: dict[str, Any] = {"num_cpus": num_cpus, "include_dashboard": include_dashboard, "log_to_driver": False,
                               **init_kwargs}
    if object_store_memory is not None:
        options["object_store_memory"] = object_store_memory
    if worker_env is not None:
        options["runtime_env"] = {"env_vars": dict(worker_env)}
    return ray.init(**options)


def start_serve(port: int | None = None) -> int:
    """Serve's HTTP proxy on 127.0.0.1:``port`` (default: a free port) with llmstack's proxy middleware, as
    ``deploy()`` starts it; returns the port."""
    from llmstack._ray import start_serve as start_llmstack_serve

    port = port or free_port()
    start_llmstack_serve({"host": "127.0.0.1", "port": port})
    return port
