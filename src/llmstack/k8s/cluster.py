"""The Ray cluster part of a manifest: head and worker groups, pod sizes, env from Secrets, probes.

Group sizes come from the stage config: Ray Train's ``scaling`` for jobs (one worker per pod, or as
many as the pod's GPUs), the Serve replicas' CPUs and autoscaling bounds for services. The worker groups are
also published on the head container (:func:`publish_node_groups`), where the driver's capacity check
(:mod:`llmstack.train.capacity`) reads them: KubeRay's autoscaler keeps its node types to itself.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from decimal import ROUND_UP, Decimal
from typing import Any

from llmstack.config import WorkersConfig
from llmstack.k8s.builders import API_KEY_ENV
from llmstack.k8s.options import AutoscalingOptions, K8sOptions, WorkerGroup, split_secret_ref

HEAD_PORTS = (("gcs-server", 6379), ("dashboard", 8265), ("client", 10001))
STORAGE_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")  # env names, also the keys in the Secret
SERVE_POD_CPUS = 2.0  # default CPUs of a serving worker pod
SIDE_DEPLOYMENT_CPUS = 0.1  # the ingress (and canary router) replica's CPU
# The name llmstack.train.capacity reads, not imported (k8s stays free of train); tests/unit/k8s looks the head's
# env up by capacity's name, so the two cannot drift apart unnoticed.
NODE_GROUPS_ENV = "LLMSTACK_NODE_GROUPS"


@dataclass
class WorkerShape:
    """How many worker pods, and what each requests."""

    min_replicas: int
    max_replicas: int
    cpu: float
    gpus: int


def train_worker_shape(scaling: WorkersConfig, worker: WorkerGroup, problems: list[str], *,
                       autoscaling: AutoscalingOptions | None = None) -> WorkerShape:
    """Pods for ``scaling.num_workers`` Ray Train workers: each takes ``cpus_per_worker`` CPUs and, on GPU, one GPU.

    Fixed: pods for the max, always. With ``autoscaling`` (KubeRay's autoscaler on): pods for the min kept,
    up to pods for the max (or the given ``min_replicas`` / ``max_replicas``).
    """
    gpus = worker.gpus if worker.gpus is not None else (1 if scaling.use_gpu else 0)
    if scaling.use_gpu and gpus == 0:
        problems.append("k8s.worker.gpus: scaling.use_gpu is true (one GPU per Ray Train worker) "
                        "but the worker group provides 0 GPUs per pod")
    if not scaling.use_gpu and gpus > 0:
        problems.append(f"k8s.worker.gpus: {gpus} GPU(s) per pod, but scaling.use_gpu is false: "
                        "the Ray Train workers would not use them")
    if scaling.use_gpu and gpus > 0:
        per_pod = gpus
        cpu = worker.cpu if worker.cpu is not None else scaling.cpus_per_worker * per_pod
    else:
        cpu = worker.cpu if worker.cpu is not None else scaling.cpus_per_worker
        per_pod = int(cpu // scaling.cpus_per_worker + 1e-9)
    if cpu < scaling.cpus_per_worker * max(per_pod, 1) - 1e-9:
        problems.append(f"k8s.worker.cpu: {cpu:g} CPUs per pod cannot hold its {max(per_pod, 1)} worker(s) "
                        f"at scaling.cpus_per_worker={scaling.cpus_per_worker:g}")
        per_pod = 0
    fewest, workers = (scaling.num_workers,) * 2 if isinstance(scaling.num_workers, int) else scaling.num_workers
    replicas = worker.replicas if worker.replicas is not None else math.ceil(workers / max(per_pod, 1))
    if per_pod and replicas * per_pod < workers:
        unit = "GPU" if scaling.use_gpu else "worker slot"
        problems.append(f"k8s.worker.replicas: {replicas} pod(s) x {per_pod} {unit}(s) provide {replicas * per_pod}, "
                        f"but scaling.num_workers={scaling.num_workers} needs {workers}")
    if autoscaling is None:
        return WorkerShape(min_replicas=replicas, max_replicas=replicas, cpu=cpu, gpus=gpus)
    # Autoscaled: the pods of the run's min are kept, those of its max are the ceiling.
    low = autoscaling.min_replicas if autoscaling.min_replicas is not None else math.ceil(fewest / max(per_pod, 1))
    high = autoscaling.max_replicas if autoscaling.max_replicas is not None else max(replicas, low)
    if per_pod and high * per_pod < fewest:
        problems.append(f"k8s.autoscaling.max_replicas: {high} pod(s) x {per_pod} worker slot(s) can never hold the "
                        f"{fewest} worker(s) scaling.num_workers={scaling.num_workers} starts with")
    return WorkerShape(min_replicas=min(low, high), max_replicas=high, cpu=cpu, gpus=gpus)


def serve_worker_shape(*, replica_cpus: float, replica_gpus: float, min_model_replicas: int,
                       max_model_replicas: int, side_deployments: int, worker: WorkerGroup,
                       problems: list[str]) -> WorkerShape:
    """Pods for the app's model replicas (autoscaled between the bounds) plus its small side deployments."""
    cpu = worker.cpu if worker.cpu is not None else max(SERVE_POD_CPUS, replica_cpus)
    gpus = worker.gpus if worker.gpus is not None else math.ceil(replica_gpus)
    if replica_cpus > cpu:
        problems.append(f"k8s.worker.cpu: a model replica needs num_cpus={replica_cpus:g}, a worker pod has {cpu:g}")
    if replica_gpus > gpus:
        problems.append(f"k8s.worker.gpus: a model replica needs {replica_gpus:g} GPU(s), "
                        f"the worker group provides {gpus} per pod")
    if gpus and not replica_gpus:
        problems.append(f"k8s.worker.gpus: {gpus} GPU(s) per pod, but the app's model replicas request none "
                        "(num_gpus is 0), so no worker group GPU would be used")
    per_pod = max(1, int(cpu // replica_cpus)) if replica_cpus else max_model_replicas
    if replica_gpus:
        per_pod = min(per_pod, int(gpus // replica_gpus) or 1)

    def pods(model_replicas: int) -> int:  # whole replicas per pod, and room for the side deployments
        demand = model_replicas * replica_cpus + side_deployments * SIDE_DEPLOYMENT_CPUS
        return max(1, math.ceil(model_replicas / per_pod), math.ceil(demand / cpu - 1e-9))

    low, high = pods(min_model_replicas), pods(max_model_replicas)
    if worker.replicas is not None:
        if worker.replicas < low:
            problems.append(f"k8s.worker.replicas: {worker.replicas} pod(s) cannot hold the app's "
                            f"{min_model_replicas} minimum model replica(s); it needs {low}")
        low = high = worker.replicas
    return WorkerShape(min_replicas=low, max_replicas=max(low, high), cpu=cpu, gpus=gpus)


def pod_env(options: K8sOptions, *, with_api_key: bool) -> list[dict[str, Any]]:
    """The env of every pod: plain values, then each credential as a ``secretKeyRef`` (never a value)."""
    env: list[dict[str, Any]] = [{"name": name, "value": value} for name, value in sorted(options.env.items())]
    if options.storage_secret:
        env += [_secret_env(name, options.storage_secret, name) for name in STORAGE_SECRET_KEYS]
    env += [_secret_env(name, *split_secret_ref(ref)) for name, ref in sorted(options.env_secrets.items())]
    if with_api_key and options.api_key_secret:
        env.append(_secret_env(API_KEY_ENV, *split_secret_ref(options.api_key_secret)))
    return env


def head_group(options: K8sOptions, env: list[dict[str, Any]], *, extra_ports: tuple[tuple[str, int], ...] = ()
               ) -> dict[str, Any]:
    """``headGroupSpec``: a head that schedules no Ray work (num-cpus 0) and serves the dashboard."""
    ports = [{"name": name, "containerPort": port} for name, port in HEAD_PORTS + extra_ports]
    container = _container("ray-head", options, cpu=options.head.cpu, memory=options.head.memory, gpus=0,
                           env=env, ports=ports)
    return {"rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
            "template": _pod_template(options, container)}


def worker_group(options: K8sOptions, shape: WorkerShape, env: list[dict[str, Any]], *,
                 ports: list[dict[str, Any]] | None = None, probes: dict[str, Any] | None = None) -> dict[str, Any]:
    """``workerGroupSpecs[0]``: ``shape.min_replicas`` to ``shape.max_replicas`` identical pods."""
    container = _container("ray-worker", options, cpu=shape.cpu, memory=options.worker.memory, gpus=shape.gpus,
                           env=env, ports=ports or [])
    container.update(probes or {})
    return {"groupName": options.worker.group_name, "replicas": shape.min_replicas,
            "minReplicas": shape.min_replicas, "maxReplicas": shape.max_replicas,
            "rayStartParams": {}, "template": _pod_template(options, container)}


def published_node_groups(cluster_spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The worker groups of a rendered RayCluster spec as Ray sees them, for :data:`NODE_GROUPS_ENV`.

    Read from the spec itself, as KubeRay's autoscaler reads a group: CPUs from the Ray container's ``cpu``
    limit rounded up, GPUs from its first non-zero limit whose name ends in ``gpu``; pods between
    ``minReplicas`` and ``maxReplicas`` with the in-tree autoscaler on, else exactly ``replicas``.
    """
    autoscaled = bool(cluster_spec.get("enableInTreeAutoscaling"))
    groups = []
    for group in cluster_spec["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        resources = {"CPU": _whole(limits["cpu"])}
        gpus = next((_whole(amount) for name, amount in limits.items() if name.endswith("gpu") and _whole(amount)), 0)
        if gpus:
            resources["GPU"] = gpus
        low, high = (group["minReplicas"], group["maxReplicas"]) if autoscaled else (group["replicas"],) * 2
        groups.append({"group": group["groupName"], "resources": resources, "min": low, "max": high})
    return groups


def publish_node_groups(cluster_spec: dict[str, Any]) -> None:
    """Put :func:`published_node_groups` on the head container as :data:`NODE_GROUPS_ENV` (JSON).

    Call it on the finished spec, so the published groups are the manifest's own.
    """
    head = cluster_spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    value = json.dumps(published_node_groups(cluster_spec), separators=(",", ":"))
    head.setdefault("env", []).append({"name": NODE_GROUPS_ENV, "value": value})


def health_probes(path: str, port: int, options: K8sOptions) -> dict[str, Any]:
    """Readiness and liveness of a serving pod on the app's health route (through the pod's Serve proxy)."""
    service = options.service
    get = {"path": path, "port": port}
    return {
        "readinessProbe": {"httpGet": get, "periodSeconds": service.readiness_period_s, "failureThreshold": 3,
                           "timeoutSeconds": 5},
        "livenessProbe": {"httpGet": dict(get), "initialDelaySeconds": service.liveness_initial_delay_s,
                          "periodSeconds": 10, "failureThreshold": service.liveness_failure_threshold,
                          "timeoutSeconds": 5},
    }


def cpu_quantity(cpus: float) -> str:
    """A CPU count as a Kubernetes quantity: ``"2"`` or ``"1500m"``."""
    millis = round(cpus * 1000)
    return str(millis // 1000) if millis % 1000 == 0 else f"{millis}m"


def _whole(quantity: Any) -> int:
    """A Kubernetes quantity rounded up to a whole number: ``"1500m"`` -> 2, ``"4"`` -> 4, ``1`` -> 1."""
    text = str(quantity)
    amount = Decimal(text[:-1]) / 1000 if text.endswith("m") else Decimal(text)
    return int(amount.to_integral_value(rounding=ROUND_UP))


def _container(name: str, options: K8sOptions, *, cpu: float, memory: str, gpus: int,
               env: list[dict[str, Any]], ports: list[dict[str, Any]]) -> dict[str, Any]:
    amounts: dict[str, Any] = {"cpu": cpu_quantity(cpu), "memory": memory}
    if gpus:
        amounts[options.worker.gpu_resource] = gpus
    container: dict[str, Any] = {"name": name, "image": options.image,
                                 "resources": {"requests": dict(amounts), "limits": dict(amounts)}}
    if env:
        container["env"] = [dict(item) for item in env]
    if ports:
        container["ports"] = ports
    return container


def _pod_template(options: K8sOptions, container: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": [container]}
    if options.service_account:
        spec["serviceAccountName"] = options.service_account
    return {"spec": spec}


def _secret_env(env_name: str, secret: str, key: str) -> dict[str, Any]:
    return {"name": env_name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}
