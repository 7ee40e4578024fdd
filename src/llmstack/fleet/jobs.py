"""Training and fine-tuning runs as Ray Jobs on a running cluster (Ray's Job Submission SDK).

:func:`submit_job` validates a ``train`` or ``finetune`` config here, checks that one worker fits some
node of the cluster (or a node type its autoscaler can add), and submits ``python -m llmstack.fleet.job_entry
<kind>`` (``llmstack <kind> --config``) with the resolved config in the job's environment
(:mod:`llmstack.fleet.job_entry` says why not a working_dir). The job registers its result in the registry
exactly as ``llmstack train`` / ``llmstack finetune`` do; its metrics (worker-seconds, busy worker-seconds, queue
wait from this submission) land in the registered version's manifest. :func:`list_jobs`,
:func:`job_status`, :func:`job_logs` and :func:`stop_job` follow the job.

The cluster is found at ``address`` (a dashboard URL such as ``http://127.0.0.1:8265``), else
``RAY_ADDRESS``, else the local cluster. Token authentication works either way: when a token exists
(``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``) and ``RAY_AUTH_MODE`` is not
``disabled``, it is sent as a bearer token (a cluster without auth ignores it).

Example:
    >>> job_id = submit_job("train.yaml", overrides=["training.max_steps=50"])  # doctest: +SKIP
    >>> job_status(job_id).status  # doctest: +SKIP
    'RUNNING'
"""

from __future__ import annotations

import os
import re
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from llmstack.errors import ConfigError, LLMStackError, ResourceError
from llmstack.fleet.job_entry import JOB_CONFIG_ENV
from llmstack.train.driver import SUBMITTED_AT_ENV  # run_training reads it: queue wait from the submission

JobKind = Literal["train", "finetune"]
KINDS: tuple[str, ...] = ("train", "finetune")
_REGISTERED = re.compile(r"^registered (\S+@v\d+)", re.M)
# Not TOKENIZERS_PARALLELISM: ray.init in the job sets it, and Ray refuses a key set twice.
_FORWARDED_ENV = ("HF_HUB_OFFLINE", "LLMSTACK_VERBOSE", "LLMSTACK_REGISTRY")


@dataclass
class JobRecord:
    """One llmstack job as the cluster reports it.

    Attributes:
        job_id: the submission id (``llmstack jobs status ID``).
        status: Ray's job status: PENDING, RUNNING, STOPPED, SUCCEEDED or FAILED.
        kind: ``train`` or ``finetune`` (empty for a job llmstack did not submit).
        name: the run / registry name of the job's config.
        message: Ray's status message (why it failed, what it waits for).
        submitted_at: epoch seconds of the submission (None for other jobs).
        start_time: epoch seconds the job's driver started, per Ray; None while pending.
        end_time: epoch seconds it ended; None while running.
        registered: the registry version the job produced (read from its log once it succeeded).
    """

    job_id: str
    status: str
    kind: str = ""
    name: str = ""
    message: str = ""
    submitted_at: float | None = None
    start_time: float | None = None
    end_time: float | None = None
    registered: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "metadata"}


# --------------------------------------------------------------------------- the client


def auth_headers() -> dict[str, str]:
    """A bearer header with this user's Ray token, unless token auth is switched off or no token exists."""
    if os.environ.get("RAY_AUTH_MODE", "").strip().lower() == "disabled":
        return {}
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
        try:
            token = path.read_text(encoding="utf-8").strip()
        except OSError:
            token = ""
    return {"Authorization": f"Bearer {token}"} if token else {}


def connect(address: str | None = None) -> Any:
    """A ``JobSubmissionClient`` for ``address`` (else ``RAY_ADDRESS``, else the local cluster).

    Raises:
        ResourceError: nothing answers at that address (one line naming it).
    """
    from ray.job_submission import JobSubmissionClient

    where = address or os.environ.get("RAY_ADDRESS") or "auto"
    try:
        return JobSubmissionClient(address or None, headers=auth_headers())
    except Exception as exc:  # ConnectionError, or ray's own when no local cluster exists
        reason = " ".join(str(exc).split())[:200]
        raise ResourceError(f"no Ray cluster answers at {where} ({type(exc).__name__}: {reason}); start one with "
                            "`ray start --head` or pass --address / set RAY_ADDRESS to its dashboard URL "
                            "(http://HOST:8265)") from None


# --------------------------------------------------------------------------- submit


def job_kind(config: dict[str, Any], kind: str | None = None) -> JobKind:
    """``kind`` if given, else the config's own ``kind:`` key, else what its keys say (base/lora: finetune;
    model: train)."""
    chosen = kind or config.get("kind")
    if chosen is None:
        if "base" in config or "lora" in config:
            chosen = "finetune"
        elif "model" in config:
            chosen = "train"
    if chosen not in KINDS:
        got = f"got {chosen!r}" if chosen is not None else "the config has no kind, base, lora or model key"
        raise ConfigError(f"kind: must be one of {', '.join(KINDS)} ({got}); pass --kind train|finetune "
                          "or add `kind: train` to the config")
    return chosen  # type: ignore[return-value]


def resolve_job_config(config: str | Path | dict[str, Any], *, kind: str | None = None,
                       overrides: Iterable[str] = (), registry: str | None = None) -> tuple[JobKind, Any]:
    """The job's kind and its validated config dataclass (every problem reported here, before submitting)."""
    from llmstack.config import FinetuneConfig, TrainConfig, load_config

    if isinstance(config, (str, Path)):
        path = Path(config).expanduser()
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except OSError as exc:
            raise ConfigError(f"--config: cannot read {path}: {exc.strerror or exc}") from None
    else:
        raw = dict(config)
    if not isinstance(raw, dict):
        raise ConfigError(f"--config: {config} holds a {type(raw).__name__}, not a mapping of config keys")
    chosen = job_kind(raw, kind)
    raw = {k: v for k, v in raw.items() if k != "kind"}
    overrides = list(overrides)
    if registry:
        overrides.insert(0, f"registry={registry}")
    cls = TrainConfig if chosen == "train" else FinetuneConfig
    cfg = load_config(cls, raw, overrides)
    # The job runs in its own working directory: relative local paths would land there.
    for key in ("registry", "storage_path"):
        value = getattr(cfg, key)
        if value and "://" not in value and not Path(value).expanduser().is_absolute():
            setattr(cfg, key, str(Path(value).expanduser().resolve()))
    return chosen, cfg


def submit_job(config: str | Path | dict[str, Any], *, kind: str | None = None, overrides: Iterable[str] = (),
               address: str | None = None, registry: str | None = None, submission_id: str | None = None,
               env: dict[str, str] | None = None) -> str:
    """Submit a training or fine-tuning run to a Ray cluster as a Ray Job; return its submission id.

    Args:
        config: a YAML file, or a dict, of a :class:`~llmstack.config.TrainConfig` or
            :class:`~llmstack.config.FinetuneConfig` (``kind: train|finetune`` may be one of its keys).
        kind: ``train`` or ``finetune``; default: the config's ``kind``, else inferred from its keys.
        overrides: ``key.path=value`` strings applied on top of ``config``.
        address: the cluster's dashboard URL; default ``RAY_ADDRESS``, else the local cluster.
        registry: registry URL written into the job's config (default: the config's own).
        submission_id: the job id (default ``<kind>-<name>-<random>``).
        env: extra environment variables for the job.

    Returns:
        The submission id, for :func:`job_status`, :func:`job_logs` and :func:`stop_job`.

    Raises:
        ConfigError: the config is invalid (every problem, with its key path).
        ResourceError: the cluster does not answer, or no node can ever hold one worker.

    Example:
        >>> submit_job({"name": "lm", "training": {"max_steps": 20}}, kind="train")  # doctest: +SKIP
        'train-lm-1a2b3c4d'
    """
    from llmstack.config import to_dict

    chosen, cfg = resolve_job_config(config, kind=kind, overrides=overrides, registry=registry)
    client = connect(address)
    check_job_fits(cfg.scaling, node_resources(client), autoscaling=autoscaler_adds_nodes(client))
    submission_id = submission_id or f"{chosen}-{cfg.name}-{uuid.uuid4().hex[:8]}"
    submitted_at = time.time()
    job_env = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}
    job_env.update(env or {})
    job_env[SUBMITTED_AT_ENV] = f"{submitted_at:.3f}"
    job_env[JOB_CONFIG_ENV] = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    client.submit_job(
        entrypoint=f"python -m llmstack.fleet.job_entry {chosen}",
        submission_id=submission_id,
        runtime_env={"env_vars": job_env},
        metadata={"llmstack_kind": chosen, "llmstack_name": cfg.name, "llmstack_submitted_at": f"{submitted_at:.3f}"},
    )
    return submission_id


# --------------------------------------------------------------------------- fit check


def node_resources(client: Any) -> list[dict[str, float]]:
    """Total resources of every alive node, from the cluster's state API."""
    import requests

    response = requests.get(f"{client.get_address()}/api/v0/nodes", params={"limit": 10000, "detail": "false"},
                            headers=auth_headers(), timeout=30)
    response.raise_for_status()
    nodes = response.json()["data"]["result"]["result"]
    return [{k: float(v) for k, v in node.get("resources_total", {}).items()}
            for node in nodes if node.get("state") == "ALIVE"]


def autoscaler_node_types(status: dict[str, Any] | None) -> set[str]:
    """The node type names in the v1 autoscaler's report (``/api/cluster_status``), the readonly mirror's left out.

    A cluster without an autoscaling config runs a readonly autoscaler that names every node ``node_<id>``;
    any other name is a node type of a real autoscaler (``ray start --autoscaling-config``, ``ray up``, KubeRay).
    Read from the values (node name -> type, pending nodes), which the dashboard leaves as they are (it
    camel-cases keys).
    """
    from ray.autoscaler._private.util import format_readonly_node_type

    status = status or {}
    report = status.get("autoscalerReport") or status.get("autoscaler_report") or {}
    mapping = report.get("nodeTypeMapping") or report.get("node_type_mapping") or {}
    pending = report.get("pendingNodes") or report.get("pending_nodes") or []
    names = set(mapping.values()) | {entry[1] for entry in pending if len(entry) > 1}
    readonly = format_readonly_node_type("")
    return {name for name in names if not (name.startswith(readonly) and len(name) > len(readonly) + 16)}


def autoscaler_adds_nodes(client: Any) -> bool:
    """Whether the cluster's autoscaler can add nodes of its own node types (False when unknown)."""
    import requests

    try:
        response = requests.get(f"{client.get_address()}/api/cluster_status", headers=auth_headers(), timeout=30)
        response.raise_for_status()
        return bool(autoscaler_node_types(response.json()["data"].get("clusterStatus")))
    except (requests.RequestException, KeyError, ValueError):
        return False


def check_job_fits(scaling: Any, nodes: list[dict[str, float]], *, autoscaling: bool = False) -> None:
    """Refuse a job none of whose workers could ever be placed: no node has the CPUs (and GPU) of one worker.

    Checks one worker against each node's total resources, not what is free now: a busy cluster queues
    the job, an impossible request fails here instead of waiting forever. On an ``autoscaling`` cluster
    a node the autoscaler can still add may hold it: the job's driver then judges it by the autoscaler's
    node types (``check_cluster``, :mod:`llmstack.train.capacity`) and fails at its start when none can.
    """
    if not nodes:  # a cluster still starting: nothing to judge by yet
        return
    need = {"CPU": float(scaling.cpus_per_worker)}
    if scaling.use_gpu:
        need["GPU"] = 1.0
    if autoscaling or any(all(node.get(name, 0.0) >= amount for name, amount in need.items()) for node in nodes):
        return
    largest = ", ".join(f"{name} {max((n.get(name, 0.0) for n in nodes), default=0.0):g}" for name in need)
    wanted = ", ".join(f"{name} {amount:g}" for name, amount in need.items())
    raise ResourceError(
        f"no node of the cluster can hold one worker of this job: one worker needs {wanted} "
        f"(scaling.cpus_per_worker={scaling.cpus_per_worker:g}{', scaling.use_gpu=true' if scaling.use_gpu else ''}) "
        f"but the largest of its {len(nodes)} nodes has {largest}; lower scaling.cpus_per_worker or add larger nodes")


# --------------------------------------------------------------------------- follow


def _record(details: Any, logs: str | None = None) -> JobRecord:
    metadata = dict(details.metadata or {})
    submitted = metadata.get("llmstack_submitted_at")
    registered = None
    if logs is not None:
        found = _REGISTERED.findall(logs)
        registered = found[-1] if found else None
    return JobRecord(job_id=details.submission_id or details.job_id or "", status=str(details.status.value),
                     kind=metadata.get("llmstack_kind", ""), name=metadata.get("llmstack_name", ""),
                     message=details.message or "", submitted_at=float(submitted) if submitted else None,
                     start_time=details.start_time / 1000 if details.start_time else None,
                     end_time=details.end_time / 1000 if details.end_time else None,
                     registered=registered, metadata=metadata)


def list_jobs(*, address: str | None = None, all_jobs: bool = False) -> list[JobRecord]:
    """The cluster's submitted jobs, oldest first (only llmstack's unless ``all_jobs``)."""
    client = connect(address)
    records = [_record(d) for d in client.list_jobs() if d.submission_id]
    if not all_jobs:
        records = [r for r in records if r.kind]
    return sorted(records, key=lambda r: r.submitted_at or r.start_time or 0.0)


def _details(client: Any, job_id: str) -> Any:
    try:
        return client.get_job_info(job_id)
    except RuntimeError as exc:
        if "does not exist" in str(exc) or "404" in str(exc):
            raise LLMStackError(f"no job {job_id!r} on the cluster at {client.get_address()}; `llmstack jobs list` "
                                "shows its jobs", status_code=404, type="not_found_error") from None
        raise


def job_status(job_id: str, *, address: str | None = None) -> JobRecord:
    """The job's status; once it succeeded, also the registry version it produced."""
    client = connect(address)
    details = _details(client, job_id)
    logs = client.get_job_logs(job_id) if str(details.status.value) == "SUCCEEDED" else None
    return _record(details, logs)


def job_logs(job_id: str, *, address: str | None = None) -> str:
    """Everything the job's driver printed so far."""
    client = connect(address)
    _details(client, job_id)
    return client.get_job_logs(job_id)


def stop_job(job_id: str, *, address: str | None = None) -> bool:
    """Ask the cluster to stop the job; True if it was running (False: it had already ended)."""
    client = connect(address)
    _details(client, job_id)
    return bool(client.stop_job(job_id))


def wait_for_job(job_id: str, *, address: str | None = None, timeout_s: float = 600.0,
                 poll_s: float = 2.0) -> JobRecord:
    """Poll until the job ends (SUCCEEDED, FAILED or STOPPED) or ``timeout_s`` passes; the last status."""
    deadline = time.monotonic() + timeout_s
    while True:
        record = job_status(job_id, address=address)
        if record.status in ("SUCCEEDED", "FAILED", "STOPPED") or time.monotonic() > deadline:
            return record
        time.sleep(poll_s)


__all__ = ["JobRecord", "auth_headers", "autoscaler_adds_nodes", "autoscaler_node_types", "check_job_fits", "connect",
           "job_kind", "job_logs", "job_status", "list_jobs", "node_resources", "resolve_job_config", "stop_job",
           "submit_job", "wait_for_job"]
