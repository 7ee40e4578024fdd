"""The driver side of training: cluster, fail-fast checks, Ray Train run, metrics, registration.

Two layers:

* :func:`run_training` runs any :class:`~llmstack.train.loop.LoopSpec` on Ray Train (DDP/FSDP,
  checkpoints in storage, resume by run name, fault tolerance, progress bar, metrics.jsonl and a
  loss plot). ``finetune_lora()`` calls it with its own spec and data.
* :func:`train` is pretraining: prepare data once on the driver, build a preset model spec, call
  :func:`run_training`, register the final model with its lineage.

Kept as one module (~520 lines): the fail-fast checks, the trainer assembly and the registration
share the run's resolved state, in the order a run goes through them.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmstack._ray import LOCAL_OBJECT_STORE_BYTES, connect, start_local, worker_runtime_env
from llmstack._verbs import Overrides, open_registry, read_settings
from llmstack.config import LoopConfig, TrainConfig, WorkersConfig, to_dict
from llmstack.errors import ConfigError, ResourceError
from llmstack.train.checkpoint import SIGNATURE_FILE, model_signature, signature_differences
from llmstack.train.elastic import global_batch_blocks, is_elastic, largest_step_blocks, ray_num_workers, worker_range
from llmstack.train.storage import Storage, probe, resolve_storage

if TYPE_CHECKING:
    from llmstack.train.capacity import AutoscalerLimits
    from llmstack.registry import ArtifactRef, Registry
    from llmstack.train.loop import LoopSpec

# Environment forwarded from the driver to every worker (test hooks and tokenizer settings).
_FORWARDED_ENV = ("LLMSTACK_FAULT_AT_STEP", "LLMSTACK_FAULT_FLAG", "LLMSTACK_FAULT_RANK", "LLMSTACK_STEP_DELAY_S",
                  "LLMSTACK_EMULATED_DEVICE_S",
                  "HF_HUB_OFFLINE",
                  "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")
SUBMITTED_AT_ENV = "LLMSTACK_SUBMITTED_AT"  # epoch seconds a Ray Job was submitted (set by llmstack.fleet.jobs)


@dataclass
class RunOutcome:
    """What :func:`run_training` returns.

    Attributes:
        checkpoint_dir: a local directory holding the final checkpoint (``model.safetensors``,
            ``config.json``, ``state.json``...); a temporary copy when storage is remote.
        checkpoint_path: where that checkpoint lives in storage (path or URL).
        run_dir: the run directory in storage (checkpoints, metrics.jsonl, loss_curve.png).
        metrics: the final step's metrics (train loss, eval loss, perplexity, tokens...).
        history: per-step records of the final trajectory (replayed steps replace lost ones).
        recoveries: one entry per worker-group restart: resumed step, last step seen, steps lost.
        resumed_from_step: the checkpoint step this call started from (a rerun of the same run
            name), or None for a fresh run.
        wall_time_s: seconds spent in ``trainer.fit()``.
        cost: what the run used: ``worker_hours`` (wall time x workers), ``cpu_hours``, ``gpu_hours``
            and, with ``scaling.price_per_worker_hour``, ``cost_usd``.
        usage: ``worker_seconds`` held by the worker groups, ``busy_worker_seconds`` inside optimizer
            steps, ``worker_utilisation`` and ``queue_wait_s`` (submission, or the request for workers,
            to the first worker group; see :func:`~llmstack.train.progress.worker_usage`).
    """

    checkpoint_dir: Path
    checkpoint_path: str
    run_dir: str
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    recoveries: list[dict[str, Any]] = field(default_factory=list)
    resumed_from_step: int | None = None
    wall_time_s: float = 0.0
    temporary: bool = False
    cost: dict[str, float] = field(default_factory=dict)
    usage: dict[str, float] = field(default_factory=dict)

    def cleanup(self) -> None:
        """Remove the local copy of a remote checkpoint."""
        if self.temporary:
            shutil.rmtree(self.checkpoint_dir, ignore_errors=True)


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        ref: the registered model (``name@vN``, kind ``model``).
        metrics: final metrics (loss, eval_loss, perplexity, tokens, steps...).
        history: per-step metrics records.
        run_dir: run directory in checkpoint storage.
        checkpoint_path: the final checkpoint in storage.
        tokenizer_ref: the tokenizer version the model was trained with (its lineage parent).
        recoveries: worker-group restarts survived (see :class:`RunOutcome`).
        resumed_from_step: the checkpoint step a rerun of the same name continued from, else None.
    """

    ref: ArtifactRef
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    run_dir: str
    checkpoint_path: str
    tokenizer_ref: ArtifactRef | None = None
    recoveries: list[dict[str, Any]] = field(default_factory=list)
    resumed_from_step: int | None = None

    def __str__(self) -> str:
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.metrics.items())
        return f"{self.ref} ({shown})"


# --------------------------------------------------------------------------- train()


def train(config: TrainConfig | Mapping[str, Any] | str | Path | None = None, *,
          registry: Registry | str | None = None, overrides: Overrides = (), progress: bool = True,
          **settings: Any) -> TrainResult:
    """Pretrain a causal LM on Ray Train and register it.

    Connects to the Ray cluster at ``scaling.address`` / ``RAY_ADDRESS`` (or the one already
    initialised), else starts a bounded local one. Everything that can be checked before workers
    start is checked first: worker count vs cluster, sequence length vs model positions, batch vs
    dataset, storage writability, and a checkpoint directory left by a different model.

    The model is ``model.source`` (a registry ref, local HF directory or hub id to continue pretraining;
    unset: a fresh ``model.preset``), set like any other key (``llmstack train MODEL`` on the CLI).

    Args:
        config: a :class:`TrainConfig`, a mapping of its fields, or a YAML file path (None: defaults).
        registry: a :class:`Registry` or URL; default ``config.registry``, then ``$LLMSTACK_REGISTRY``.
        overrides: ``key.path=value`` strings (or a mapping of key paths to values) applied on top of ``config``.
        progress: show the progress bar.
        **settings: top-level config keys as values, applied last, e.g. ``name="my-lm"`` or
            ``training={"max_steps": 20}`` (merged into the section).

    Returns:
        A :class:`TrainResult`: ``.ref`` is the registered model (an :class:`~llmstack.registry.ArtifactRef`),
        plus the run's metrics and history.

    Raises:
        ConfigError: bad keys or values (all listed, each by key path), a block size beyond the model's
            positions, a batch larger than the data.
        ResourceError: a cluster too small for ``scaling``.

    Example:
        >>> import llmstack
        >>> result = llmstack.train(name="doc-lm", training={"max_steps": 20},
        ...                         scaling={"num_workers": 1})  # doctest: +SKIP
        >>> result.ref, result.metrics["eval_loss"]  # doctest: +SKIP
    """
    from llmstack.models import PRESETS, preset_config

    cfg, _ = read_settings("train", TrainConfig, config, overrides, settings)
    registry = open_registry(registry, cfg.registry)

    # Cheap checks first: no data, no cluster needed.
    source_model = None
    if cfg.model.source is None:
        positions = cfg.model.max_seq_len or PRESETS[cfg.model.preset]["max_position_embeddings"]
        where = f"model.preset={cfg.model.preset}"
    else:
        from llmstack.models import load_artifact

        source_model = load_artifact(cfg.model.source, registry=registry, dtype=cfg.model.dtype,
                                     with_tokenizer=False).model
        # max_position_embeddings (GPT-2's n_positions maps to it); None: no learned limit (ALiBi...).
        positions = getattr(source_model.config, "max_position_embeddings", None)
        where = f"model.source={cfg.model.source}"
    if positions is not None and cfg.data.block_size > positions:
        raise ConfigError(f"data.block_size: {cfg.data.block_size} tokens exceed the model's {positions} positions "
                          f"({where}); lower data.block_size to <= {positions} or raise model.max_seq_len")
    check_training(cfg.training, cfg.scaling)
    storage = resolve_storage(cfg.storage_path or default_storage_path(registry), cfg.storage_options)
    fs = probe(storage, cfg.name)
    ensure_ray(cfg.scaling)
    check_cluster(cfg.scaling)

    # Data, once, on the driver.
    tokenizer, tokenizer_ref = _tokenizer(cfg, registry, source_model)
    from llmstack.data import prepare_training_data

    tokenizer, packed, corpus = prepare_training_data(cfg.data, tokenizer=tokenizer)
    if tokenizer_ref is None:
        tokenizer_ref = register_tokenizer(registry, f"{cfg.name}-tokenizer", tokenizer, corpus=corpus,
                                           vocab_size=cfg.data.vocab_size)
    vocab_size = cfg.model.vocab_size or len(tokenizer)
    if vocab_size < len(tokenizer):
        raise ConfigError(f"model.vocab_size: {vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens; "
                          "leave model.vocab_size unset to take it from the tokenizer")

    # The model each worker builds: a seeded preset, or the source model's weights via the object store.
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    if source_model is None:
        factory: Any = functools.partial(build_preset_model, cfg.model.preset, vocab_size=vocab_size,
                                         max_seq_len=cfg.model.max_seq_len, seed=cfg.training.seed, **special)
        model_config = preset_config(cfg.model.preset, vocab_size=vocab_size, max_seq_len=cfg.model.max_seq_len,
                                     **special)
    else:
        import ray

        if len(tokenizer) > source_model.config.vocab_size:
            raise ConfigError(f"data.tokenizer has {len(tokenizer)} tokens but {cfg.model.source} embeds only "
                              f"{source_model.config.vocab_size}; train with the model's own tokenizer")
        model_config = source_model.config
        factory = functools.partial(build_from_weights, source_model.config.to_dict(),
                                    [ray.put({k: v.detach().clone() for k, v in source_model.state_dict().items()})])
    from llmstack.train.loop import LoopSpec

    spec = LoopSpec(model_factory=factory, signature=model_signature(model_config))
    from llmstack.train.tracking import track_run

    with track_run(cfg.tracking, run_name=cfg.name, params=to_dict(cfg), kind="train") as tracker:
        outcome = run_training(spec, {"input_ids": packed.train},
                               {"input_ids": packed.eval} if len(packed.eval) else None, training=cfg.training,
                               scaling=cfg.scaling, run_name=cfg.name, storage=storage,
                               fs=fs, progress=progress, on_record=tracker.log_step)
        try:
            model = factory()
            from safetensors.torch import load_file

            model.load_state_dict(load_file(str(outcome.checkpoint_dir / "model.safetensors")))
            metrics = final_metrics(outcome)
            parents = [str(tokenizer_ref)]
            source_ref = _source_ref(cfg.model.source, registry)
            if source_ref is not None and str(source_ref) not in parents:
                parents.append(str(source_ref))
            from llmstack.models import register_model

            ref = register_model(registry, cfg.name, model, tokenizer, kind="model", parents=parents,
                                 config=to_dict(cfg), metrics=metrics, data_fingerprint=packed.fingerprint,
                                 extra={"run_dir": outcome.run_dir, "checkpoint": outcome.checkpoint_path,
                                        "corpus": corpus.name, "corpus_fingerprint": corpus.fingerprint,
                                        "train_blocks": int(len(packed.train)), "eval_blocks": int(len(packed.eval)),
                                        "recoveries": outcome.recoveries, "model_signature": spec.signature})
        finally:
            outcome.cleanup()
        tracker.finish(metrics, registry_version=str(ref))
    return TrainResult(ref=ref, metrics=metrics, history=outcome.history, run_dir=outcome.run_dir,
                       checkpoint_path=outcome.checkpoint_path, tokenizer_ref=tokenizer_ref,
                       recoveries=outcome.recoveries, resumed_from_step=outcome.resumed_from_step)


def build_preset_model(preset: str, *, vocab_size: int, max_seq_len: int | None, seed: int,
                       bos_token_id: int | None = None, eos_token_id: int | None = None,
                       pad_token_id: int | None = None) -> Any:
    """A seeded preset model (picklable through ``functools.partial``; runs on each worker)."""
    from types import SimpleNamespace

    from llmstack.models import build_model

    special = SimpleNamespace(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    return build_model(preset, vocab_size=vocab_size, max_seq_len=max_seq_len, seed=seed, tokenizer=special)


def build_from_weights(config: dict[str, Any], weights: list[Any]) -> Any:
    """An HF causal LM from a config dict and a state dict in the object store (``[ObjectRef]``)."""
    import ray
    from transformers import AutoConfig, AutoModelForCausalLM

    model_config = AutoConfig.for_model(**config)
    model = AutoModelForCausalLM.from_config(model_config)
    state = weights[0] if isinstance(weights[0], dict) else ray.get(weights[0])
    model.load_state_dict(state)
    return model


def final_metrics(outcome: RunOutcome) -> dict[str, Any]:
    """The numbers stored in the model's manifest."""
    keep = ("loss", "eval_loss", "perplexity", "tokens", "step", "epoch")
    metrics = {k: outcome.metrics[k] for k in keep if k in outcome.metrics}
    metrics["train_time_s"] = round(outcome.wall_time_s, 2)
    metrics["recoveries"] = len(outcome.recoveries)
    metrics.update(outcome.cost)  # worker/CPU/GPU hours and cost_usd: in the manifest, so in the lineage
    metrics.update(outcome.usage)  # worker-seconds held and busy, queue wait
    return metrics


def run_cost(wall_time_s: float, scaling: WorkersConfig) -> dict[str, float]:
    """Resources a run held for ``wall_time_s`` (restarts included), priced when the config gives a price."""
    worker_hours = wall_time_s / 3600.0 * worker_range(scaling.num_workers)[1]  # elastic: an upper bound (max)
    cost = {"worker_hours": round(worker_hours, 6), "cpu_hours": round(worker_hours * scaling.cpus_per_worker, 6)}
    if scaling.use_gpu:
        cost["gpu_hours"] = round(worker_hours, 6)
    if scaling.price_per_worker_hour is not None:
        cost["cost_usd"] = round(worker_hours * scaling.price_per_worker_hour, 6)
    return cost


# --------------------------------------------------------------------------- run_training()


def run_training(spec: LoopSpec, train_data: dict[str, Any], eval_data: dict[str, Any] | None, *,
                 training: LoopConfig, scaling: WorkersConfig, run_name: str,
                 storage: Storage | str, storage_options: dict[str, Any] | None = None, fs: Any = None,
                 progress: bool = True, desc: str | None = None,
                 on_record: Callable[[dict[str, Any]], None] | None = None,
                 callbacks: list[Any] | None = None) -> RunOutcome:
    """Run :func:`~llmstack.train.loop.run_worker_loop` on Ray Train workers and collect the result.

    The shared engine of ``train()`` and ``finetune_lora()``: it fails fast on a batch larger than
    the data, an unwritable storage location, a checkpoint directory of a different model
    (``spec.signature``) and a cluster too small; ships the tensors through the object store;
    resumes from the latest complete checkpoint of ``run_name``; survives ``scaling.max_failures``
    worker failures; and writes ``metrics.jsonl`` and ``loss_curve.png`` into the run directory.

    Args:
        spec: what each worker trains.
        train_data: ``{"input_ids": LongTensor[N, T], ...}``; optional ``labels``/``attention_mask``.
        eval_data: held-out tensors in the same layout, or None.
        training: loop settings.
        scaling: workers, strategy, GPU use, failures tolerated, Ray address.
        run_name: Ray Train run name; the same name resumes.
        storage: a :class:`Storage` or a path/URL (with ``storage_options``).
        storage_options: fsspec options for a URL ``storage``.
        fs: an fsspec filesystem already probed for ``storage`` (skips the probe).
        progress: show a progress bar.
        desc: progress bar label (default: the run name).
        on_record: called on the driver (from a background thread) with each per-step record,
            e.g. to forward metrics to a Ray Tune scheduler.
        callbacks: ``ray.train.UserCallback`` instances for the Ray Train controller (e.g. Ray Tune's
            ``TuneReportCallback``); they see the metrics of every ``ray.train.report`` (eval and
            checkpoint steps).
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from llmstack.train.loop import train_loop_per_worker
    from llmstack.train.progress import MetricsLog, Pump, start_bus, worker_usage

    storage = storage if isinstance(storage, Storage) else resolve_storage(storage, storage_options)
    check_training(training, scaling)
    check_batch(training, scaling, num_blocks=len(train_data["input_ids"]))
    if fs is None:
        fs = probe(storage, run_name)
    check_signature(fs, storage.join(run_name), spec.signature)
    ensure_ray(scaling)
    check_cluster(scaling)

    # Queue wait counts from the Ray Job's submission (llmstack jobs submit), else from this request for workers.
    queued_since = float(os.environ.get(SUBMITTED_AT_ENV) or time.time())
    bus = start_bus()
    storage_path, storage_filesystem = storage.for_ray()
    env = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    loop_config = {
        "spec": spec, "training": training, "strategy": scaling.strategy, "use_gpu": scaling.use_gpu,
        "train_data": [ray.put(train_data)], "eval_data": [ray.put(eval_data)] if eval_data is not None else None,
        "threads": max(1, int(scaling.cpus_per_worker)), "bus": bus,
        # Elastic runs keep the full-size global batch: each worker group derives its accumulation from it.
        "global_batch": global_batch_blocks(micro_batch_size=training.micro_batch_size,
                                            grad_accum_steps=training.grad_accum_steps,
                                            num_workers=scaling.num_workers) if is_elastic(scaling.num_workers) else None,
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        scaling_config=_ray_scaling(scaling),
        run_config=RunConfig(
            name=run_name, storage_path=storage_path, storage_filesystem=storage_filesystem,
            checkpoint_config=CheckpointConfig(num_to_keep=training.num_to_keep),
            failure_config=FailureConfig(max_failures=scaling.max_failures),
            worker_runtime_env={"env_vars": env}, callbacks=list(callbacks or []),
        ),
    )
    run_path = storage.join(run_name)
    log = MetricsLog(fs, run_path, total=training.max_steps, desc=desc or run_name, show=progress,
                     on_record=on_record)
    started = time.perf_counter()
    try:
        with Pump(bus, log):
            result = trainer.fit()
    finally:
        log.close()
        for action in (log.write, log.plot):
            try:
                action()
            except Exception as exc:  # metrics files are a convenience; never mask the run's outcome
                print(f"llmstack: could not write {action.__name__} output to {run_path}: {exc}")
        ray.kill(bus, no_restart=True)
    wall = time.perf_counter() - started
    usage = worker_usage(log.worker_groups, busy_worker_seconds=log.busy_worker_seconds, ended_at=time.time(),
                         queued_since=queued_since)
    resumed_from_step = log.initial_resume
    if result.checkpoint is None:
        raise RuntimeError(f"run {run_name} finished without a checkpoint in {storage.url}")
    checkpoint_fs_path = result.checkpoint.path
    if storage.is_local:
        local, temporary = Path(checkpoint_fs_path), False
    else:
        local, temporary = Path(result.checkpoint.to_directory(tempfile.mkdtemp(prefix="llmstack-final-"))), True
    from llmstack.train.checkpoint import STATE_FILE, read_json

    state = read_json(local / STATE_FILE)
    metrics = dict(state.get("metrics") or {})
    return RunOutcome(checkpoint_dir=local, checkpoint_path=storage.url_of(checkpoint_fs_path),
                      run_dir=storage.url_of(run_path), metrics=metrics, history=list(log.history),
                      recoveries=list(log.recoveries), wall_time_s=wall, temporary=temporary,
                      resumed_from_step=resumed_from_step, cost=run_cost(wall, scaling), usage=usage)


def _ray_scaling(scaling: WorkersConfig) -> Any:
    from ray.train import ScalingConfig as RayScalingConfig

    resources = {"CPU": float(scaling.cpus_per_worker)}
    if scaling.use_gpu:
        resources["GPU"] = 1.0
    # [min, max] -> Ray Train's elastic (min, max): start on what fits, grow and shrink at restarts.
    return RayScalingConfig(num_workers=ray_num_workers(scaling.num_workers), use_gpu=scaling.use_gpu,
                            resources_per_worker=resources,
                            elastic_resize_monitor_interval_s=scaling.elastic_resize_interval_s)


# --------------------------------------------------------------------------- cluster and checks


def ensure_ray(scaling: WorkersConfig) -> None:
    """Use the initialised Ray; else connect to ``scaling.address``/``RAY_ADDRESS``; else start a local one.

    The local cluster is bounded: this machine's CPUs (a request for more fails here, before Ray
    starts) and a 512 MiB object store.
    """
    import ray

    if ray.is_initialized():
        return
    address = scaling.address or os.environ.get("RAY_ADDRESS")
    if address:
        connect(address, runtime_env=worker_runtime_env())
        return
    cpus = os.cpu_count() or 1
    needed = worker_range(scaling.num_workers)[0] * scaling.cpus_per_worker  # elastic: min must fit
    if needed > cpus:
        raise ResourceError(
            f"scaling.num_workers={scaling.num_workers} x scaling.cpus_per_worker={scaling.cpus_per_worker} needs "
            f"{needed:g} CPUs but this machine has {cpus}; lower scaling.num_workers or scaling.cpus_per_worker, "
            "or connect to a larger cluster with scaling.address / RAY_ADDRESS")
    # The dashboard serves the state API that Ray Train's placement-group cleaner polls.
    start_local(cpus, LOCAL_OBJECT_STORE_BYTES, runtime_env=worker_runtime_env())


def check_cluster(scaling: WorkersConfig) -> None:
    """Fail before any worker starts if the cluster can never place the requested workers.

    A fixed cluster must hold the run's minimum workers now. On an autoscaling cluster the run's demand is what
    adds nodes, so it is refused only when no node type can hold one worker or all node types at their max
    cannot hold the minimum (:mod:`llmstack.train.capacity`).
    """
    import ray

    from llmstack.train.capacity import read_autoscaler_limits

    limits = read_autoscaler_limits()
    resources = ray.cluster_resources()
    if limits is not None and limits.scales:
        check_autoscaling_fit(scaling, limits)
    else:
        check_fixed_fit(scaling, resources)


def check_autoscaling_fit(scaling: WorkersConfig, limits: AutoscalerLimits) -> None:
    """Refuse a run no node type the autoscaler can add will ever hold, naming what it asks and what they offer."""
    from llmstack.train.capacity import fit_problem, worker_shape

    fewest = worker_range(scaling.num_workers)[0]
    problem = fit_problem(worker_shape(scaling.cpus_per_worker, scaling.use_gpu), fewest=fewest, limits=limits)
    if problem:
        raise ResourceError(
            f"scaling.num_workers={scaling.num_workers} (scaling.cpus_per_worker={scaling.cpus_per_worker:g}"
            f"{', scaling.use_gpu=true' if scaling.use_gpu else ''}) can never run on this autoscaling cluster: "
            f"{problem}; lower scaling.num_workers or scaling.cpus_per_worker, or add a larger node type")


def check_fixed_fit(scaling: WorkersConfig, resources: Mapping[str, float]) -> None:
    """Refuse a run whose minimum workers the cluster's current resources cannot hold."""
    cpus = float(resources.get("CPU", 0.0))
    fewest = worker_range(scaling.num_workers)[0]  # an elastic run starts on its min
    needed = fewest * scaling.cpus_per_worker
    if needed > cpus:
        fit = int(cpus // scaling.cpus_per_worker)
        raise ResourceError(
            f"scaling.num_workers={scaling.num_workers} needs {needed:g} CPUs "
            f"(scaling.cpus_per_worker={scaling.cpus_per_worker:g}) but the Ray cluster has {cpus:g}; "
            f"set scaling.num_workers<={max(fit, 1)} or lower scaling.cpus_per_worker, or add nodes")
    if scaling.use_gpu:
        gpus = float(resources.get("GPU", 0.0))
        if fewest > gpus:
            raise ResourceError(
                f"scaling.num_workers={scaling.num_workers} with scaling.use_gpu=true needs one GPU per worker but "
                f"the Ray cluster has {gpus:g}; set scaling.num_workers<={int(gpus)} or scaling.use_gpu=false")


def check_training(training: LoopConfig, scaling: WorkersConfig) -> None:
    """Combinations the config dataclasses cannot check alone."""
    if training.precision == "fp16" and not scaling.use_gpu:
        raise ConfigError("training.precision: fp16 needs CUDA (a gradient scaler on GPU); "
                          "use precision=bf16 on CPU or set scaling.use_gpu=true")


def check_batch(training: LoopConfig, scaling: WorkersConfig, *, num_blocks: int) -> None:
    """The effective batch must fit in the training set at least once."""
    step_blocks = largest_step_blocks(micro_batch_size=training.micro_batch_size,
                                      grad_accum_steps=training.grad_accum_steps, num_workers=scaling.num_workers)
    if num_blocks < step_blocks:
        raise ConfigError(
            f"training.micro_batch_size={training.micro_batch_size} x training.grad_accum_steps="
            f"{training.grad_accum_steps} x scaling.num_workers={scaling.num_workers} = "
            f"{step_blocks} blocks per step, but the training set has only {num_blocks} blocks; "
            "lower micro_batch_size, grad_accum_steps or num_workers, a smaller data.block_size, or add data")


def check_signature(fs: Any, run_path: str, signature: dict[str, Any]) -> None:
    """Refuse a run directory whose checkpoints belong to a different model; record ours otherwise."""
    import json

    if not signature:
        return
    path = f"{run_path}/{SIGNATURE_FILE}"
    try:
        with fs.open(path, "r") as handle:
            stored = json.load(handle)
    except FileNotFoundError:
        with fs.open(path, "w") as handle:
            json.dump(signature, handle, indent=1, sort_keys=True)
        return
    differences = signature_differences(stored, signature)
    if differences:
        run_name = run_path.rstrip("/").rsplit("/", 1)[-1]
        raise ConfigError(
            f"checkpoint directory {run_path} holds checkpoints of a different model ({'; '.join(differences)}); "
            f"choose a new run name (name=...), point storage_path elsewhere, or delete {run_name} to start over")


def default_storage_path(registry: Any) -> str:
    """``<registry>/../runs`` for local and object-store registries; ``~/.llmstack/runs`` otherwise."""
    url = str(registry.url)
    if url.startswith("file://"):
        url = url.removeprefix("file://")
    if "://" not in url:
        return str(Path(url).expanduser().resolve().parent / "runs")
    protocol, _, rest = url.partition("://")
    if protocol in ("s3", "s3a", "gs", "gcs", "abfs", "az") and "/" in rest.strip("/"):
        return f"{protocol}://{rest.strip('/').rsplit('/', 1)[0]}/runs"
    return str(Path("~/.llmstack/runs").expanduser())


# --------------------------------------------------------------------------- tokenizer lineage


def _tokenizer(cfg: TrainConfig, registry: Registry, source_model: Any) -> tuple[Any, ArtifactRef | None]:
    """The tokenizer to use (None: let data preparation train one) and its registry ref if it has one."""
    if cfg.data.tokenizer:
        from llmstack.models import describe_artifact, load_tokenizer

        artifact = describe_artifact(cfg.data.tokenizer, registry=registry)
        tokenizer = load_tokenizer(artifact)
        ref = artifact.ref
        if ref is None:
            ref = register_tokenizer(registry, f"{cfg.name}-tokenizer", tokenizer, corpus=None,
                                     vocab_size=len(tokenizer))
        return tokenizer, ref
    if source_model is not None and cfg.model.source:
        from llmstack.models import describe_artifact, load_tokenizer

        artifact = describe_artifact(cfg.model.source, registry=registry)
        return load_tokenizer(artifact), artifact.ref
    return None, None


def _source_ref(source: str | None, registry: Registry) -> ArtifactRef | None:
    if not source:
        return None
    from llmstack.models import describe_artifact

    return describe_artifact(source, registry=registry).ref


def register_tokenizer(registry: Registry, name: str, tokenizer: Any, *, corpus: Any, vocab_size: int) -> ArtifactRef:
    """Register ``tokenizer`` (kind tokenizer), reusing the latest version when its files are identical."""
    with tempfile.TemporaryDirectory(prefix="llmstack-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        hashes = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in Path(tmp).iterdir() if p.is_file()}
        try:
            versions = registry.list(name)
        except Exception:
            versions = []
        if versions:
            latest = versions[-1]
            if {k: v.get("sha256") for k, v in latest.files.items()} == hashes:
                return latest.ref
        return registry.register(
            name, tmp, kind="tokenizer",
            config={"vocab_size": len(tokenizer), "requested_vocab_size": vocab_size,
                    "corpus": getattr(corpus, "name", None)},
            metrics={"documents": len(corpus.documents)} if corpus is not None else {},
            data_fingerprint=getattr(corpus, "fingerprint", None))


__all__ = ["RunOutcome", "TrainResult", "check_autoscaling_fit", "check_batch", "check_cluster", "check_fixed_fit",
           "check_signature", "check_training",
           "default_storage_path", "ensure_ray", "final_metrics", "run_cost", "run_training", "train"]
