"""What the manifest needs beyond the stage config: image, namespace, pod sizes, Secret references.

These options never go into the stage config itself, so the same ``train.yaml`` or
``serve_configs/tiny.yaml`` still runs unchanged with ``llmstack train`` or ``serve run``. They come
from ``--k8s-config FILE``, ``k8s.key.path=value`` overrides and the ``--image`` / ``--namespace`` flags.

Example:
    >>> opts = load_k8s_options({"image": "ghcr.io/acme/llmstack:0.1"}, ["k8s.worker.gpus=1"])
    >>> opts.worker.gpus
    1
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from llmstack.config import Problems, load_config, to_dict
from llmstack.errors import ConfigError

OVERRIDE_PREFIX = "k8s."
QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$")  # a Kubernetes memory quantity
DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]{0,45}[a-z0-9])?$")  # KubeRay keeps RayJob/RayService names <= 47
NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")  # a Secret's name
IMAGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@-]*$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
SECRET_WORDS = ("secret", "password", "token", "credential", "api_key", "apikey", "private_key", "account_key")


def looks_secret(name: str) -> bool:
    """True for a key name that holds a credential (``aws_secret_access_key``, ``api_key``, ``key``, ...)."""
    lowered = name.lower().replace("-", "_")
    return lowered in ("key", "aws_access_key_id") or any(word in lowered for word in SECRET_WORDS)


@dataclass
class HeadGroup:
    cpu: float = 1.0  # CPUs requested by the head pod (Ray schedules no work there: num-cpus 0)
    memory: str = "4Gi"  # memory request and limit of the head pod

    def check(self) -> Problems:
        return _pod_problems(self.cpu, self.memory)


@dataclass
class WorkerGroup:
    group_name: str = "workers"  # workerGroupSpecs[0].groupName
    replicas: int | None = None  # pods; None: as many as the stage needs (train: one per worker or per GPUs)
    cpu: float | None = None  # CPUs per pod; None: what the pod's share of the stage needs (serve: 2)
    memory: str = "8Gi"  # memory request and limit per pod
    gpus: int | None = None  # GPUs per pod; None: 1 when scaling.use_gpu is true, else 0
    gpu_resource: str = "nvidia.com/gpu"  # the extended resource name the GPUs are requested under

    def check(self) -> Problems:
        problems = _pod_problems(self.cpu, self.memory)
        for name in ("replicas", "gpus"):
            value = getattr(self, name)
            if value is not None and value < (1 if name == "replicas" else 0):
                problems.append((name, f"must be >= {1 if name == 'replicas' else 0}, got {value}"))
        if not DNS_LABEL.match(self.group_name):
            problems.append(("group_name", f"must be a lowercase DNS label, got {self.group_name!r}"))
        return problems


@dataclass
class JobOptions:
    """RayJob-only settings (train, finetune)."""

    shutdown_after_finish: bool = True  # shutdownAfterJobFinishes: delete the cluster when the job ends
    ttl_seconds_after_finished: int = 600  # keep the finished cluster this long (logs) before deleting it
    active_deadline_s: int | None = None  # fail the job after this many seconds; None: no deadline
    backoff_limit: int = 0  # retries of the whole job (each on a new cluster)
    runtime_env: dict[str, Any] = field(default_factory=dict)  # extra runtimeEnvYAML (env_vars, pip, ...)

    def check(self) -> Problems:
        problems: Problems = []
        for name in ("ttl_seconds_after_finished", "backoff_limit"):
            if getattr(self, name) < 0:
                problems.append((name, f"must be >= 0, got {getattr(self, name)}"))
        if self.active_deadline_s is not None and self.active_deadline_s < 1:
            problems.append(("active_deadline_s", f"must be >= 1, got {self.active_deadline_s}"))
        env = self.runtime_env.get("env_vars") or {}
        for name in env if isinstance(env, Mapping) else ():
            if looks_secret(str(name)):
                problems.append((f"runtime_env.env_vars.{name}", "an inline secret is refused; "
                                 "name a Secret with k8s.env_secrets instead"))
        return problems


@dataclass
class AutoscalingOptions:
    """KubeRay's in-tree autoscaler on a RayJob's cluster (train, finetune): pending Ray Train demand adds pods."""

    enabled: bool | None = None  # None: on for an elastic run (scaling.num_workers: [min, max]) outside a Kueue queue
    min_replicas: int | None = None  # worker pods kept; None: the pods scaling.num_workers' min needs
    max_replicas: int | None = None  # worker pods at most; None: the pods its max needs
    idle_timeout_s: int = 60  # autoscalerOptions.idleTimeoutSeconds: an idle worker pod is removed after this
    upscaling_mode: Literal["Default", "Aggressive", "Conservative"] = "Default"  # autoscalerOptions.upscalingMode

    def check(self) -> Problems:
        problems: Problems = []
        for name in ("min_replicas", "max_replicas"):
            value = getattr(self, name)
            if value is not None and value < (0 if name == "min_replicas" else 1):
                problems.append((name, f"must be >= {0 if name == 'min_replicas' else 1}, got {value}"))
        if self.min_replicas is not None and self.max_replicas is not None and self.min_replicas > self.max_replicas:
            problems.append(("min_replicas", f"must be <= max_replicas ({self.max_replicas}), got {self.min_replicas}"))
        if self.idle_timeout_s < 0:
            problems.append(("idle_timeout_s", f"must be >= 0, got {self.idle_timeout_s}"))
        return problems


@dataclass
class ServiceOptions:
    """RayService-only settings (serve, canary)."""

    upgrade_strategy: Literal["NewCluster", "None"] = "NewCluster"  # NewCluster: zero-downtime cluster swap
    readiness_period_s: int = 5  # seconds between readiness checks on the app's health route
    liveness_initial_delay_s: int = 120  # model load time allowed before liveness checks count
    liveness_failure_threshold: int = 6  # failed liveness checks (10 s apart) before a pod restarts

    def check(self) -> Problems:
        problems: Problems = []
        for name in ("readiness_period_s", "liveness_failure_threshold"):
            if getattr(self, name) < 1:
                problems.append((name, f"must be >= 1, got {getattr(self, name)}"))
        if self.liveness_initial_delay_s < 0:
            problems.append(("liveness_initial_delay_s", f"must be >= 0, got {self.liveness_initial_delay_s}"))
        return problems


@dataclass
class K8sOptions:
    image: str | None = None  # container image with llmstack (and the same Ray version) installed; required
    namespace: str = "default"  # metadata.namespace
    name: str | None = None  # metadata.name; None: from the config (run name or Serve app name)
    service_account: str | None = None  # pods' serviceAccountName (e.g. one bound to object-store access)
    api_key_secret: str | None = None  # NAME/KEY of the Secret holding the serve API key
    storage_secret: str | None = None  # NAME of a Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY
    env: dict[str, str] = field(default_factory=dict)  # plain (non-secret) env of every pod, e.g. AWS_ENDPOINT_URL
    env_secrets: dict[str, str] = field(default_factory=dict)  # ENV_NAME -> NAME/KEY of a Secret, every pod
    head: HeadGroup = field(default_factory=HeadGroup)
    worker: WorkerGroup = field(default_factory=WorkerGroup)
    job: JobOptions = field(default_factory=JobOptions)
    service: ServiceOptions = field(default_factory=ServiceOptions)
    autoscaling: AutoscalingOptions = field(default_factory=AutoscalingOptions)  # RayJob's cluster (train, finetune)
    queue: str | None = None  # Kueue LocalQueue of a RayJob: the label kueue.x-k8s.io/queue-name; None: no Kueue

    def check(self) -> Problems:
        problems: Problems = []
        if not self.image:
            problems.append(("image", "no container image given; pass --image REPO/llmstack:TAG "
                                      "(an image with llmstack installed)"))
        elif not IMAGE.match(self.image):
            problems.append(("image", f"not a container image reference: {self.image!r}"))
        if not NAMESPACE.match(self.namespace):
            problems.append(("namespace", f"must be a lowercase DNS label, got {self.namespace!r}"))
        if self.name is not None and not DNS_LABEL.match(self.name):
            problems.append(("name", f"must be a lowercase DNS label of at most 47 characters, got {self.name!r}"))
        if self.api_key_secret is not None and _secret_ref_problem(self.api_key_secret):
            problems.append(("api_key_secret", _secret_ref_problem(self.api_key_secret)))
        if self.queue is not None and not NAMESPACE.match(self.queue):
            problems.append(("queue", f"must name a Kueue LocalQueue (a lowercase DNS label), got {self.queue!r}"))
        if self.storage_secret is not None and not DNS_SUBDOMAIN.match(self.storage_secret):
            problems.append(("storage_secret", f"must name a Secret (a DNS name), got {self.storage_secret!r}"))
        for env_name in self.env:
            if not ENV_NAME.match(env_name):
                problems.append((f"env.{env_name}", "not a valid environment variable name"))
            elif looks_secret(env_name):
                problems.append((f"env.{env_name}", "an inline secret is refused; name a Secret instead: "
                                                     f"k8s.env_secrets.{env_name}=NAME/KEY"))
        for env_name, ref in self.env_secrets.items():
            if not ENV_NAME.match(env_name):
                problems.append((f"env_secrets.{env_name}", "not a valid environment variable name"))
            elif _secret_ref_problem(ref):
                problems.append((f"env_secrets.{env_name}", _secret_ref_problem(ref)))
        return problems



def split_secret_ref(ref: str) -> tuple[str, str]:
    """``"llm-api/key"`` -> ``("llm-api", "key")``: a Secret's name and the key inside it."""
    name, _, key = ref.partition("/")
    return name, key


def _secret_ref_problem(ref: str) -> str | None:
    name, key = split_secret_ref(ref)
    if not DNS_SUBDOMAIN.match(name) or not re.match(r"^[-._A-Za-z0-9]+$", key):
        return f"must be a Secret reference NAME/KEY (e.g. llm-api/key), got {ref!r}"
    return None


def _pod_problems(cpu: float | None, memory: str) -> Problems:
    problems: Problems = []
    if cpu is not None and not cpu > 0:
        problems.append(("cpu", f"must be > 0, got {cpu}"))
    if not QUANTITY.match(memory):
        problems.append(("memory", f"must be a Kubernetes quantity such as 8Gi, got {memory!r}"))
    return problems


@dataclass
class _Root:
    k8s: K8sOptions = field(default_factory=K8sOptions)


def load_k8s_options(source: str | Path | Mapping[str, Any] | K8sOptions | None = None,
                     overrides: Iterable[str] = ()) -> K8sOptions:
    """Parse the options (a YAML file, a dict or an instance) plus ``k8s.key=value`` overrides.

    Problems name their key path under ``k8s.`` (``k8s.worker.gpus: must be >= 0, got -1``).

    Raises:
        ConfigError: every problem found.
    """
    if isinstance(source, K8sOptions):
        data: Any = to_dict(source)
    elif isinstance(source, (str, Path)):
        data = _read_yaml(Path(source))
    else:
        data = dict(source or {})
    return load_config(_Root, {"k8s": data}, overrides).k8s


def _read_yaml(path: Path) -> Any:
    import yaml

    if not path.is_file():
        raise ConfigError(f"k8s options file not found: {path}")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {exc}".replace("\n", " "), source=str(path)) from None


def split_overrides(overrides: Iterable[str]) -> tuple[list[str], list[str]]:
    """Separate ``k8s.*`` overrides (the manifest's options) from the stage config's overrides."""
    k8s: list[str] = []
    stage: list[str] = []
    for item in overrides:
        (k8s if item.strip().startswith(OVERRIDE_PREFIX) else stage).append(item.strip())
    return k8s, stage
