"""Assemble KubeRay manifests: a ``RayJob`` for train/finetune, a ``RayService`` for serve/canary."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from llmstack.errors import ConfigError
from llmstack.k8s import cluster
from llmstack.k8s.builders import BUILDERS
from llmstack.k8s.options import (AutoscalingOptions, JobOptions, K8sOptions, ServiceOptions, load_k8s_options,
                                  split_overrides)
from llmstack.k8s.stage import JOB_KINDS, KINDS, Stage, job_entrypoint, load_stage

API_VERSION = "ray.io/v1"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
# The job's runtime env; Train V2 runs its controller without a CPU, so a num-cpus 0 head is enough.
RUNTIME_ENV_VARS = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_TELEMETRY": "1", "RAY_TRAIN_V2_ENABLED": "1"}


def render_manifest(kind: str, config: str | Path | Mapping[str, Any] | Any, *, image: str | None = None,
                    namespace: str | None = None, overrides: Iterable[str] = (),
                    options: str | Path | Mapping[str, Any] | K8sOptions | None = None) -> dict[str, Any]:
    """Render the KubeRay manifest that runs ``config`` on Kubernetes.

    Args:
        kind: ``train`` or ``finetune`` (a ``RayJob`` running ``llmstack train|finetune`` with the same
            config), ``serve`` or ``canary`` (a ``RayService`` whose ``serveConfigV2`` is the Serve app
            of a ``serve_configs/*.yaml`` file).
        config: the stage config: a YAML path, a dict or a config object.
        image: container image with llmstack installed (or ``k8s.image`` in ``options``); required.
        namespace: ``metadata.namespace`` (default ``default``).
        overrides: ``key.path=value`` for the stage config, ``k8s.key.path=value`` for the manifest
            options (:class:`~llmstack.k8s.options.K8sOptions`: pod sizes, GPUs, Secret references).
        options: manifest options as a YAML path, a dict or a ``K8sOptions``.

    Returns:
        The manifest as plain data (write it with :func:`manifest_yaml` / :func:`write_manifest`).

    Raises:
        ConfigError: every problem at once: a config the kind cannot express, GPU counts no worker
            group provides, a missing image, an inline secret (it must be a Secret reference).

    Example:
        >>> job = render_manifest("train", {"registry": "s3://ml/registry", "storage_path": "s3://ml/runs"},
        ...                       image="ghcr.io/acme/llmstack:0.1", overrides=["k8s.storage_secret=s3-creds"])
        >>> job["kind"], job["spec"]["entrypoint"].split()[:2]
        ('RayJob', ['llmstack', 'train'])
    """
    if kind not in KINDS:
        raise ConfigError(f"kind: unknown kind {kind!r}; known: {', '.join(KINDS)}")
    k8s_overrides, stage_overrides = split_overrides(overrides)
    for key, value in (("image", image), ("namespace", namespace)):
        if value is not None:
            k8s_overrides.insert(0, f"k8s.{key}={json.dumps(value)}")
    problems: list[str] = []
    opts: K8sOptions | None = None
    try:
        opts = load_k8s_options(options, k8s_overrides)
    except ConfigError as exc:
        problems.extend(exc.problems)
    stage = load_stage(kind, config, stage_overrides, problems)
    manifest: dict[str, Any] = {}
    if stage is not None and opts is not None:
        problems.extend(_options_the_kind_cannot_express(kind, opts))
        build = _ray_job if kind in JOB_KINDS else _ray_service
        manifest = build(stage, opts, problems)
    if problems:
        raise ConfigError(problems, source=str(config) if isinstance(config, (str, Path)) else None)
    return manifest


def manifest_yaml(manifest: Mapping[str, Any]) -> str:
    """The manifest as YAML for ``kubectl apply -f``; multi-line strings (serveConfigV2) as ``|`` blocks."""
    return yaml.dump(dict(manifest), Dumper=_ManifestDumper, sort_keys=False, width=120)


def write_manifest(manifest: Mapping[str, Any], path: str | Path) -> Path:
    """Write :func:`manifest_yaml` to ``path`` (parents created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(manifest_yaml(manifest), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- the two kinds


def _ray_job(stage: Stage, opts: K8sOptions, problems: list[str]) -> dict[str, Any]:
    cfg = stage.config
    autoscale = _job_autoscaling(cfg.scaling, opts, problems)
    shape = cluster.train_worker_shape(cfg.scaling, opts.worker, problems,
                                       autoscaling=opts.autoscaling if autoscale else None)
    env = cluster.pod_env(opts, with_api_key=False)
    runtime_env = {**opts.job.runtime_env}
    runtime_env["env_vars"] = {**RUNTIME_ENV_VARS, **(runtime_env.get("env_vars") or {})}
    spec: dict[str, Any] = {
        "entrypoint": job_entrypoint(stage),
        "runtimeEnvYAML": yaml.safe_dump(runtime_env, sort_keys=False),
        "shutdownAfterJobFinishes": opts.job.shutdown_after_finish,
        "ttlSecondsAfterFinished": opts.job.ttl_seconds_after_finished,
        "backoffLimit": opts.job.backoff_limit,
        "submissionMode": "K8sJobMode",
        "rayClusterSpec": _cluster_spec(cluster.head_group(opts, env), cluster.worker_group(opts, shape, env)),
    }
    if autoscale:  # Ray Train's pending worker demand adds pods; idle ones go after the timeout
        spec["rayClusterSpec"]["enableInTreeAutoscaling"] = True
        spec["rayClusterSpec"]["autoscalerOptions"] = {"idleTimeoutSeconds": opts.autoscaling.idle_timeout_s,
                                                       "upscalingMode": opts.autoscaling.upscaling_mode}
    cluster.publish_node_groups(spec["rayClusterSpec"])  # the driver's capacity check reads them
    if opts.job.active_deadline_s is not None:
        spec["activeDeadlineSeconds"] = opts.job.active_deadline_s
    name = opts.name or _dns_name(f"{cfg.name}-{stage.kind}")
    manifest = _resource("RayJob", name, opts, stage.kind, spec)
    if opts.queue:  # Kueue admits the job (its whole cluster) from this LocalQueue
        manifest["metadata"]["labels"][KUEUE_QUEUE_LABEL] = opts.queue
    return manifest


def _job_autoscaling(scaling: Any, opts: K8sOptions, problems: list[str]) -> bool:
    """Whether the RayJob's cluster autoscales: as asked, else for an elastic run that no Kueue queue admits."""
    elastic = not isinstance(scaling.num_workers, int) and scaling.num_workers[0] < scaling.num_workers[1]
    enabled = opts.autoscaling.enabled if opts.autoscaling.enabled is not None else elastic and not opts.queue
    if enabled and opts.queue:
        problems.append(f"k8s.queue: Kueue admits a RayJob's cluster at a fixed size and refuses one with "
                        f"enableInTreeAutoscaling; set k8s.autoscaling.enabled=false or drop k8s.queue={opts.queue}")
    return enabled


def _ray_service(stage: Stage, opts: K8sOptions, problems: list[str]) -> dict[str, Any]:
    cfg = stage.config
    auto = cfg.autoscaling
    side = 1 if stage.canary is None else 2  # the ingress, and the canary's router
    if stage.canary is None:
        low, high = auto.min_replicas, auto.max_replicas
    else:  # the stable version autoscales; every other version keeps version_replicas
        others = (1 if stage.canary.candidate else 0) + len(stage.canary.versions)
        low = auto.min_replicas + others * stage.canary.version_replicas
        high = auto.max_replicas + others * stage.canary.version_replicas
    replica = cfg.replica_resources()
    shape = cluster.serve_worker_shape(replica_cpus=replica["CPU"], replica_gpus=replica["GPU"],
                                       min_model_replicas=max(low, 1), max_model_replicas=max(high, 1),
                                       side_deployments=side, worker=opts.worker, problems=problems)
    env = cluster.pod_env(opts, with_api_key=True)
    serve_port = ("serve", cfg.http.port)
    health = cfg.http.route_prefix.rstrip("/") + "/health"
    workers = cluster.worker_group(opts, shape, env, ports=[{"name": serve_port[0], "containerPort": cfg.http.port}],
                                   probes=cluster.health_probes(health, cfg.http.port, opts))
    import_path = BUILDERS[stage.import_path] if opts.api_key_secret else stage.import_path
    serve_config = {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": cfg.http.port},
        "applications": [{"name": cfg.app_name, "route_prefix": cfg.http.route_prefix, "import_path": import_path,
                          "args": stage.app_args}],
    }
    cluster_spec = _cluster_spec(cluster.head_group(opts, env, extra_ports=(serve_port,)), workers)
    if shape.max_replicas > shape.min_replicas:
        cluster_spec["enableInTreeAutoscaling"] = True  # pods follow the Serve autoscaler's replicas
    cluster.publish_node_groups(cluster_spec)  # for training jobs submitted to this cluster
    spec: dict[str, Any] = {
        "upgradeStrategy": {"type": opts.service.upgrade_strategy},
        "excludeHeadPodFromServeSvc": True,  # traffic goes to worker pods, which have the health probes
        "serveConfigV2": yaml.safe_dump(serve_config, sort_keys=False),
        "rayClusterConfig": cluster_spec,
    }
    return _resource("RayService", opts.name or _dns_name(cfg.app_name), opts, stage.kind, spec)


# --------------------------------------------------------------------------- shared pieces


def _options_the_kind_cannot_express(kind: str, opts: K8sOptions) -> list[str]:
    if kind in JOB_KINDS:
        changed = _changed("service", opts.service, ServiceOptions())
        what = f"a RayService (serve) option; a RayJob ({kind}) cannot express it"
        extra = ["k8s.api_key_secret: a RayJob serves no API; the API key belongs to `k8s render serve`"] \
            if opts.api_key_secret else []
    else:
        changed = _changed("job", opts.job, JobOptions()) + _changed("autoscaling", opts.autoscaling,
                                                                    AutoscalingOptions())
        changed += ["queue"] if opts.queue else []
        what = f"a RayJob (train/finetune) option; a RayService ({kind}) runs until deleted and cannot express it"
        extra = []
    return [f"k8s.{path}: {what}" for path in changed] + extra


def _changed(prefix: str, options: Any, defaults: Any) -> list[str]:
    return [f"{prefix}.{f.name}" for f in dataclasses.fields(options)
            if getattr(options, f.name) != getattr(defaults, f.name)]


def _cluster_spec(head: dict[str, Any], worker: dict[str, Any]) -> dict[str, Any]:
    return {"rayVersion": _ray_version(), "headGroupSpec": head, "workerGroupSpecs": [worker]}


def _resource(kind: str, name: str, opts: K8sOptions, component: str, spec: dict[str, Any]) -> dict[str, Any]:
    labels = {"app.kubernetes.io/name": "llmstack", "app.kubernetes.io/component": component}
    return {"apiVersion": API_VERSION, "kind": kind,
            "metadata": {"name": name, "namespace": opts.namespace, "labels": labels}, "spec": spec}


def _ray_version() -> str:
    try:
        return metadata.version("ray")
    except metadata.PackageNotFoundError:  # rendering needs no Ray; the image must match the cluster anyway
        return "2.60.0"


def _dns_name(text: str) -> str:
    """A config name made a DNS label: ``tiny_lm.v2-train`` -> ``tiny-lm-v2-train`` (at most 47 characters)."""
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:47].strip("-")
    return name if name and name[0].isalpha() else f"llmstack-{name}".strip("-")[:47]


class _ManifestDumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:  # kubectl users read every value in place, no &id001 anchors
        return True


def _str_presenter(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_ManifestDumper.add_representer(str, _str_presenter)
