"""Will a training job ever fit the cluster? Judged by what the cluster's autoscaler can add, not what is up now.

On a fixed cluster a job must fit the nodes that exist. On an autoscaling cluster (Ray's autoscaler, locally
``AutoscalingCluster`` / :mod:`llmstack.fleet.local_cluster`, KubeRay's in-tree autoscaler on Kubernetes) a
job's pending demand is what makes the autoscaler add nodes, so a job is refused only when no node type can hold
one of its workers, or when all node types at their ``max_workers`` cannot hold its minimum worker count.

The node types come from Ray's own records, first found wins:

1. the cluster config held by the GCS (``ray._private.state.state.get_cluster_config()``: node groups with their
   resources and min/max counts; what Ray Train's own worker-group check reads), when an autoscaler reported one;
2. the v1 autoscaler's config file (``ray start --head --autoscaling-config``, ``ray up``), found through the
   autoscaler monitor process of this cluster's GCS on this machine (a Ray Job's driver runs on the head);
3. the worker groups ``llmstack k8s render`` published on the head pod of a KubeRay cluster, in the environment
   variable ``LLMSTACK_NODE_GROUPS`` (:data:`NODE_GROUPS_ENV`): KubeRay's autoscaler (v1 or v2, Ray 2.60) builds
   its config from the RayCluster resource in its own sidecar container and reports it to neither of the above.
   Its value is a JSON list, one entry per ``workerGroupSpecs`` item, read as KubeRay's autoscaler reads the
   group: ``[{"group": "workers", "resources": {"CPU": 2, "GPU": 1}, "min": 1, "max": 4}]``.

None found: a fixed cluster, judged by its current resources as before.

Example:
    >>> limits = AutoscalerLimits((NodeGroup("cpu2", {"CPU": 2.0}, max_count=3),))
    >>> fit_problem({"CPU": 2.0}, fewest=3, limits=limits) is None
    True
    >>> fit_problem({"CPU": 4.0}, fewest=1, limits=limits)[:59]
    'one worker asks for CPU 4 but no node type the autoscaler c'
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmstack.errors import ConfigError

UNLIMITED = -1  # a node group without a max count
NODE_GROUPS_ENV = "LLMSTACK_NODE_GROUPS"  # written on the head pod by llmstack.k8s.cluster.publish_node_groups


@dataclass(frozen=True)
class NodeGroup:
    """A kind of node the autoscaler can run (a Ray node group / available_node_types entry).

    Attributes:
        name: the node type's (node group's) name.
        resources: what one node of the type offers (``CPU``, ``GPU``, custom resources).
        max_count: how many nodes of the type may run at most; ``-1`` for no limit.
        min_count: how many it keeps up.
        head: whether this is the head node's type.
    """

    name: str
    resources: Mapping[str, float]
    max_count: int
    min_count: int = 0
    head: bool = False  # the head node's type: not counted in the cluster's max worker nodes

    def workers_per_node(self, worker: Mapping[str, float]) -> int:
        """How many workers of this shape one node holds."""
        counts = [math.floor(self.resources.get(name, 0.0) / amount + 1e-9)
                  for name, amount in worker.items() if amount > 0]
        return min(counts) if counts else 0

    def describe(self) -> str:
        """``name (CPU 2, GPU 1; up to 3 nodes)``: what a message shows of the type."""
        offered = ", ".join(f"{name} {amount:g}" for name, amount in sorted(self.resources.items())
                            if name in ("CPU", "GPU") or not name.startswith(("memory", "object_store")))
        count = "no limit" if self.max_count == UNLIMITED else f"up to {self.max_count}"
        return f"{self.name} ({offered or 'nothing'}; {count} node{'' if self.max_count == 1 else 's'})"


@dataclass(frozen=True)
class AutoscalerLimits:
    """What an autoscaling cluster can grow to: its node types and its cluster-wide caps."""

    node_types: tuple[NodeGroup, ...]
    max_nodes: int = UNLIMITED  # the v1 config's top-level max_workers: all worker nodes together
    max_resources: Mapping[str, float] = field(default_factory=dict)  # cluster-wide resource caps
    source: str = ""  # where they were read: the GCS, or the autoscaling config file's path

    @property
    def scales(self) -> bool:
        """Whether any node type can be added beyond what is kept up."""
        return any(t.max_count == UNLIMITED or t.max_count > t.min_count for t in self.node_types)


def worker_shape(cpus_per_worker: float, use_gpu: bool) -> dict[str, float]:
    """The resources one training worker asks for."""
    shape = {"CPU": float(cpus_per_worker)}
    if use_gpu:
        shape["GPU"] = 1.0
    return shape


def most_workers(worker: Mapping[str, float], limits: AutoscalerLimits) -> int | None:
    """The most workers of ``worker``'s shape the grown cluster could hold at once (None: no limit)."""
    per_type = [(t.workers_per_node(worker), t.max_count, t.head) for t in limits.node_types]
    per_type = [(per_node, count, head) for per_node, count, head in per_type if per_node > 0 and count != 0]
    if any(count == UNLIMITED for _, count, _ in per_type):
        total = None
    else:
        total = sum(per_node * count for per_node, count, _ in per_type)
    if limits.max_nodes != UNLIMITED and per_type:  # the head, then the largest nodes first under the node cap
        capped = sum(per_node for per_node, _, head in per_type if head)
        nodes_left = limits.max_nodes
        workers = [(per_node, count) for per_node, count, head in per_type if not head]
        for per_node, count in sorted(workers, reverse=True):
            take = nodes_left if count == UNLIMITED else min(count, nodes_left)
            capped, nodes_left = capped + per_node * take, nodes_left - take
        total = capped if total is None else min(total, capped)
    for name, amount in worker.items():
        if amount > 0 and name in limits.max_resources:
            by_cap = math.floor(limits.max_resources[name] / amount + 1e-9)
            total = by_cap if total is None else min(total, by_cap)
    return total


def fit_problem(worker: Mapping[str, float], *, fewest: int, limits: AutoscalerLimits) -> str | None:
    """Why a job of at least ``fewest`` workers shaped ``worker`` can never run on ``limits`` (None: it can).

    The returned text names what the job asks and what the node types offer.
    """
    asked = ", ".join(f"{name} {amount:g}" for name, amount in worker.items())
    offered = "; ".join(t.describe() for t in limits.node_types) or "no node types"
    if limits.max_nodes != UNLIMITED:
        offered += f"; at most {limits.max_nodes} worker nodes in all"
    if limits.max_resources:
        offered += "; cluster caps " + ", ".join(f"{k} {v:g}" for k, v in sorted(limits.max_resources.items()))
    if not any(t.workers_per_node(worker) > 0 and t.max_count != 0 for t in limits.node_types):
        return f"one worker asks for {asked} but no node type the autoscaler can add holds it (node types: {offered})"
    most = most_workers(worker, limits)
    if most is not None and fewest > most:
        return (f"{fewest} workers of {asked} each are needed at least, but the autoscaler's node types hold at most "
                f"{most} at once (node types: {offered})")
    return None


# --------------------------------------------------------------------------- reading them from a cluster


def limits_from_cluster_config(config: Any) -> AutoscalerLimits | None:
    """From the GCS's ``autoscaler_pb2.ClusterConfig`` (None when it has no node groups)."""
    if config is None or not config.node_group_configs:
        return None
    types = tuple(NodeGroup(group.name or f"group{i}", {k: float(v) for k, v in group.resources.items()},
                           max_count=int(group.max_count), min_count=int(group.min_count))
                  for i, group in enumerate(config.node_group_configs))
    return AutoscalerLimits(types, max_resources={k: float(v) for k, v in config.max_resources.items()},
                            source="the GCS cluster config")


def limits_from_autoscaling_config(config: Mapping[str, Any], source: str = "") -> AutoscalerLimits | None:
    """From a v1 autoscaler config (``available_node_types``, ``head_node_type``, ``max_workers``)."""
    available = config.get("available_node_types") or {}
    if not available:
        return None
    head = config.get("head_node_type")
    types = []
    for name, spec in available.items():
        resources = {k: float(v) for k, v in (spec.get("resources") or {}).items()}
        if name == head:  # the one head node
            types.append(NodeGroup(name, resources, max_count=1, min_count=1, head=True))
        else:
            most = int(spec.get("max_workers", config.get("max_workers", 0)))
            types.append(NodeGroup(name, resources, max_count=most, min_count=int(spec.get("min_workers", 0))))
    max_nodes = config.get("max_workers")
    return AutoscalerLimits(tuple(types), UNLIMITED if max_nodes is None else int(max_nodes), source=source)


def limits_from_published_groups(text: str, source: str = NODE_GROUPS_ENV) -> AutoscalerLimits | None:
    """From the JSON list of worker groups in :data:`NODE_GROUPS_ENV` (None when it lists none).

    Raises:
        ConfigError: the value is not such a list; each problem names the variable and the entry's key.
    """
    where = (f"environment variable {source} (written on the head pod by `llmstack k8s render`; "
             "render the manifest again, or unset the variable)")
    try:
        groups = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{source}: not JSON ({exc}), got {text[:80]!r}", source=where) from None
    if not isinstance(groups, list):
        raise ConfigError(f"{source}: must be a JSON list of worker groups, got {type(groups).__name__}",
                          source=where)
    problems: list[str] = []
    types = []
    for i, group in enumerate(groups):
        key = f"{source}[{i}]"
        if not isinstance(group, dict):
            problems.append(f"{key}: must be an object with group, resources, min and max, got {group!r}")
            continue
        found = _published_group_problems(group, key)
        problems.extend(found)
        if not found:
            types.append(NodeGroup(group["group"], {k: float(v) for k, v in group["resources"].items()},
                                   max_count=group["max"], min_count=group["min"]))
    if problems:
        raise ConfigError(problems, source=where)
    return AutoscalerLimits(tuple(types), source=source) if types else None


def _published_group_problems(group: Mapping[str, Any], key: str) -> list[str]:
    def is_count(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    problems = [f"{key}: missing {name!r}" for name in ("group", "resources", "min", "max") if name not in group]
    if problems:
        return problems
    if not isinstance(group["group"], str) or not group["group"]:
        problems.append(f"{key}.group: must be the worker group's name, got {group['group']!r}")
    resources = group["resources"]
    if not isinstance(resources, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < math.inf for v in resources.values()):
        problems.append(f"{key}.resources: must map resource names to amounts >= 0, got {resources!r}")
    for name in ("min", "max"):
        if not is_count(group[name]):
            problems.append(f"{key}.{name}: must be a whole number of pods >= 0, got {group[name]!r}")
    if is_count(group["min"]) and is_count(group["max"]) and group["min"] > group["max"]:
        problems.append(f"{key}.min: must be <= max ({group['max']}), got {group['min']}")
    return problems


def published_limits(environ: Mapping[str, str] = os.environ) -> AutoscalerLimits | None:
    """The worker groups published in ``environ[NODE_GROUPS_ENV]`` (None when unset or empty)."""
    text = environ.get(NODE_GROUPS_ENV, "").strip()
    return limits_from_published_groups(text) if text else None


def _monitor_config_path(gcs_address: str) -> str | None:
    """The ``--autoscaling-config`` of the v1 autoscaler monitor of ``gcs_address`` running on this machine."""
    import psutil

    for process in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            cmdline = process.info["cmdline"] or []
            if not any(part.endswith("monitor.py") for part in cmdline[:3]):
                continue
            flags = dict(part[2:].split("=", 1) for part in cmdline if part.startswith("--") and "=" in part)
            if flags.get("gcs-address") == gcs_address and flags.get("autoscaling-config"):
                return flags["autoscaling-config"]
    return None


def read_autoscaler_limits() -> AutoscalerLimits | None:
    """The connected cluster's autoscaler limits (``ray.init`` done), None on a fixed cluster.

    Raises:
        ConfigError: :data:`NODE_GROUPS_ENV` is consulted and malformed.
    """
    import ray
    import ray._private.state

    with contextlib.suppress(Exception):  # an older GCS without the key, or no connection: fall through
        limits = limits_from_cluster_config(ray._private.state.state.get_cluster_config())
        if limits is not None:
            return limits
    with contextlib.suppress(Exception):
        path = _monitor_config_path(ray.get_runtime_context().gcs_address)
        if path:
            import yaml

            text = Path(path).read_text(encoding="utf-8")
            config = json.loads(text) if text.lstrip().startswith("{") else yaml.safe_load(text)
            return limits_from_autoscaling_config(config, source=path)
    return published_limits()  # KubeRay: a malformed value raises, naming the variable


__all__ = ["NODE_GROUPS_ENV", "UNLIMITED", "AutoscalerLimits", "NodeGroup", "fit_problem",
           "limits_from_autoscaling_config", "limits_from_cluster_config", "limits_from_published_groups",
           "most_workers", "published_limits", "read_autoscaler_limits", "worker_shape"]
