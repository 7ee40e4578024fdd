"""``sweep()``: Ray Tune over learning rate, LoRA rank and alpha, with ASHA early stopping.

Every trial is one Ray Train run of the shared loop (the same engine as finetune_lora), started from
a Tune function trainable that itself holds no CPU; the workers' eval reports are forwarded to Tune
(``TuneReportCallback``) so ASHA can stop weak trials at its rungs. With the default
``max_concurrent_trials=1`` trials run one at a time, which is what a 2-CPU machine can hold. The
best finished trial's adapter is registered (kind adapter, parent = base) with the whole table of
trials in its manifest.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmstack._verbs import Overrides, read_settings
from llmstack.config import load_config, to_dict
from llmstack.errors import ConfigError, LLMStackError
from llmstack.finetune.configs import SweepConfig
from llmstack.finetune.lora import (_register_adapter, check_positions, default_storage, ensure_base_ref,
                                    open_registry)

if TYPE_CHECKING:
    from llmstack.registry import ArtifactRef, Registry

PARAMS = ("learning_rate", "rank", "alpha")


@dataclass
class SweepResult:
    """What :func:`sweep` returns.

    Attributes:
        ref: the best trial's adapter, registered under the sweep's name.
        base: the base model version.
        best: the best trial's ``learning_rate``, ``rank``, ``alpha`` and final metrics.
        trials: every trial: its parameters, last reported metrics, steps run, and whether ASHA stopped it.
    """

    ref: ArtifactRef
    base: ArtifactRef
    best: dict[str, Any]
    trials: list[dict[str, Any]] = field(default_factory=list)

    def __str__(self) -> str:
        stopped = sum(1 for t in self.trials if t.get("stopped_early"))
        params = ", ".join(f"{k}={self.best[k]}" for k in PARAMS)
        return f"{self.ref} (best of {len(self.trials)} trials, {stopped} stopped early: {params})"


def run_trial(params: dict[str, Any], *, finetune: dict[str, Any], base: str, registry: Any,
              targets: list[str] | None, tensors: Any, run_prefix: str, storage: str,
              parent_run_id: str | None = None) -> None:
    """One Tune trial: a Ray Train fine-tuning run with this trial's learning rate, rank and alpha.

    With ``finetune.tracking.mlflow_uri`` set it is an MLflow run nested under the sweep's (``parent_run_id``).
    """
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from llmstack.config import FinetuneConfig
    from llmstack.finetune.methods import ModelFactory
    from llmstack.train import run_training
    from llmstack.train.loop import LoopSpec
    from llmstack.train.tracking import track_run

    cfg = load_config(FinetuneConfig, finetune, [f"training.learning_rate={params['learning_rate']}",
                                                 f"lora.rank={params['rank']}", f"lora.alpha={params['alpha']}"])
    trial_id = tune.get_context().get_trial_id()
    factory = ModelFactory(registry=registry, base=base, method=cfg.lora.method, lora=cfg.lora,
                           target_modules=targets, seed=cfg.training.seed, use_gpu=cfg.scaling.use_gpu)
    spec = LoopSpec(model_factory=factory, checkpoint_trainable_only=True,
                    signature={"base": base, "rank": cfg.lora.rank, "alpha": cfg.lora.alpha})
    run_name = f"{run_prefix}-{trial_id}"
    with track_run(cfg.tracking, run_name=run_name, params=to_dict(cfg), kind="sweep trial",
                   parent_run_id=parent_run_id) as tracker:
        # Every eval report of the Train run reaches Tune (ASHA's input); the final one carries the checkpoint path.
        outcome = run_training(spec, tensors.train, tensors.eval, training=cfg.training, scaling=cfg.scaling,
                               run_name=run_name, storage=storage, storage_options=cfg.storage_options or None,
                               progress=False, callbacks=[TuneReportCallback()], on_record=tracker.log_step)
        tracker.finish(outcome.metrics)


def sweep(config: SweepConfig | Mapping[str, Any] | str | Path | None = None, *,
          registry: Registry | str | None = None, overrides: Overrides = (), progress: bool = True,
          **settings: Any) -> SweepResult:
    """Search learning rate, LoRA rank and alpha with Ray Tune + ASHA; register the best adapter.

    Args:
        config: a :class:`SweepConfig`, a mapping of its fields, or a YAML file path (None: defaults).
        registry: a Registry or URL (default ``config.registry``, then ``finetune.registry``).
        overrides: ``key.path=value`` strings (or a mapping of key paths to values) applied on top of ``config``.
        progress: show Tune's progress table.
        **settings: top-level config keys as values, applied last: ``base`` (the model: registry ref, directory
            or hub id; overrides ``finetune.base``), ``ranks=[4, 8]``, ``finetune={"data": {"source": ...}}`` ...

    Returns:
        A :class:`SweepResult` with the best adapter's ref and every trial's outcome.

    Raises:
        ConfigError: no base, bad search space, or the method is not LoRA-like (lora/qlora/dora).

    Example:
        >>> from llmstack.finetune import sweep
        >>> r = sweep({"search": "grid", "ranks": [4, 8]}, base="tiny-lm@v1")  # doctest: +SKIP
    """
    from ray import tune

    from llmstack.finetune.data import instruction_tensors
    from llmstack.finetune.methods import check_bitsandbytes, resolve_target_modules
    from llmstack.models import load_artifact
    from llmstack.train.driver import check_batch, check_cluster, check_training, ensure_ray

    cfg, _ = read_settings("sweep", SweepConfig, config, overrides, settings)
    ft = cfg.finetune
    ft.base = cfg.base or ft.base
    if not ft.base:
        raise ConfigError("base: no base model given; set base (sweep(base=...), `llmstack sweep MODEL` or base: in "
                          "the config)")
    if ft.lora.method not in ("lora", "qlora", "dora"):
        raise ConfigError(f"finetune.lora.method: a sweep over rank and alpha needs lora, qlora or dora, "
                          f"got {ft.lora.method!r}")
    if ft.lora.method == "qlora":
        check_bitsandbytes("cuda" if ft.scaling.use_gpu else "cpu")
    reg = open_registry(registry, cfg.registry or ft.registry)
    base_ref = ensure_base_ref(ft.base, reg)  # an outside base is registered under its own name
    base = load_artifact(str(base_ref), registry=reg)
    base_model, tokenizer = base.model, base.tokenizer
    check_positions(base_model.config, ft.data.block_size, str(base_ref))
    targets = resolve_target_modules(base_model, ft.lora.target_modules)
    base_config = base_model.config
    del base_model
    tensors = instruction_tensors(ft.data.source, tokenizer, max_length=ft.data.block_size, packing=ft.packing,
                                  max_rows=ft.data.max_documents, storage_options=ft.data.storage_options or None,
                                  columns=ft.data.columns or None, chat_template=ft.data.chat_template,
                                  train_on_inputs=ft.data.train_on_inputs)
    check_training(ft.training, ft.scaling)
    check_batch(ft.training, ft.scaling, num_blocks=len(tensors.train["input_ids"]))
    ensure_ray(ft.scaling)
    check_cluster(ft.scaling)

    if cfg.search == "grid":
        space = {"learning_rate": tune.grid_search(list(cfg.learning_rates)), "rank": tune.grid_search(list(cfg.ranks)),
                 "alpha": tune.grid_search(list(cfg.alphas))}
    else:
        space = {"learning_rate": tune.choice(list(cfg.learning_rates)), "rank": tune.choice(list(cfg.ranks)),
                 "alpha": tune.choice(list(cfg.alphas))}
    storage = default_storage(reg, ft.storage_path)
    run_prefix = f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if ft.tracking.mlflow_uri and "://" not in ft.tracking.mlflow_uri:  # a file store: trials run in other dirs
        ft.tracking.mlflow_uri = os.path.abspath(ft.tracking.mlflow_uri)
    from llmstack.train.tracking import track_run

    with track_run(ft.tracking, run_name=cfg.name, params=to_dict(cfg), kind="sweep") as tracker:
        ref, best, trials = _run_sweep(cfg, ft, space, reg, base_ref=base_ref, base_config=base_config,
                                       targets=targets, tensors=tensors, storage=storage, run_prefix=run_prefix,
                                       progress=progress, tracker=tracker)
        tracker.finish({**{k: best[k] for k in ("eval_loss", "loss", "step") if best.get(k) is not None},
                        **{f"best_{k}": best[k] for k in PARAMS}}, registry_version=str(ref))
    return SweepResult(ref=ref, base=base_ref, best=best, trials=trials)


def _run_sweep(cfg: SweepConfig, ft: Any, space: dict[str, Any], reg: Registry, *, base_ref: ArtifactRef,
               base_config: Any, targets: list[str] | None, tensors: Any, storage: str, run_prefix: str,
               progress: bool, tracker: Any) -> tuple[ArtifactRef, dict[str, Any], list[dict[str, Any]]]:
    """Run the Tune trials, register the best one's adapter: (its ref, the best trial, every trial)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, finetune=to_dict(ft), base=str(base_ref), registry=reg, targets=targets,
                             tensors=tensors, run_prefix=run_prefix, storage=storage,
                             parent_run_id=tracker.run_id),
        {"CPU": 0, "memory": 1 << 20})  # no CPU: the trial's Ray Train workers take them; 1 MiB keeps a bundle
    scheduler = ASHAScheduler(time_attr="step", max_t=ft.training.max_steps,
                              grace_period=min(cfg.grace_period * ft.training.eval_every, ft.training.max_steps),
                              reduction_factor=cfg.reduction_factor)
    tune_storage, tune_fs = _tune_storage(storage, ft.storage_options)
    tuner = tune.Tuner(
        trainable, param_space=space,
        tune_config=tune.TuneConfig(metric=cfg.metric, mode="min", scheduler=scheduler, num_samples=1 if cfg.search == "grid" else cfg.num_samples,
                                    max_concurrent_trials=cfg.max_concurrent_trials,
                                    search_alg=_seeded_search(cfg)),
        run_config=tune.RunConfig(name=run_prefix, storage_path=tune_storage, storage_filesystem=tune_fs,
                                  verbose=1 if progress else 0),
    )
    grid = tuner.fit()
    trials = []
    for result in grid:
        metrics = dict(result.metrics or {})
        params = {k: (result.config or {}).get(k) for k in PARAMS}
        # Finished = reached the last step; its report carries the final checkpoint's path.
        finished = metrics.get("step") == ft.training.max_steps and bool(metrics.get("checkpoint_path"))
        trials.append({**params, "trial_id": metrics.get("trial_id"), "step": metrics.get("step"),
                       "eval_loss": metrics.get("eval_loss"), "loss": metrics.get("loss"), "finished": finished,
                       "stopped_early": not finished and result.error is None,
                       "error": str(result.error).splitlines()[0] if result.error else None,
                       "checkpoint_path": metrics.get("checkpoint_path")})
    tracker.settle_children({f"{run_prefix}-{t['trial_id']}": {"llmstack.trial_outcome": _outcome(t)}
                             for t in trials if t["trial_id"]})
    done = [t for t in trials if t["finished"] and t.get(cfg.metric) is not None]
    if not done:
        errors = "; ".join(t["error"] for t in trials if t["error"]) or (
            "every trial was stopped early; last reports: " + "; ".join(
                f"step {t['step']} {cfg.metric}={t.get(cfg.metric)}" for t in trials))
        raise LLMStackError(f"sweep {cfg.name}: no trial finished ({errors})")
    best = min(done, key=lambda t: t[cfg.metric])
    ref = _register_best(reg, cfg, best, base_ref=base_ref, base_config=base_config, targets=targets,
                         tensors=tensors, trials=trials, storage_options=ft.storage_options)
    return ref, best, trials


def _outcome(trial: dict[str, Any]) -> str:
    return "finished" if trial["finished"] else "stopped_early" if trial["stopped_early"] else "error"


def _seeded_search(cfg: SweepConfig) -> Any:
    if cfg.search == "grid":
        return None
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=cfg.seed)


def _tune_storage(storage: str, options: dict[str, Any]) -> tuple[str, Any]:
    from llmstack.train.storage import resolve_storage

    return resolve_storage(storage, options or None).for_ray()


def _register_best(reg: Registry, cfg: SweepConfig, best: dict[str, Any], *, base_ref: ArtifactRef, base_config: Any,
                   targets: list[str] | None, tensors: Any, trials: list[dict[str, Any]],
                   storage_options: dict[str, Any]) -> ArtifactRef:
    """Register the best trial's final checkpoint as the sweep's adapter."""
    import tempfile

    from safetensors.torch import load_file

    from llmstack.finetune.methods import ModelFactory
    from llmstack.train.storage import resolve_storage

    ft = copy.deepcopy(cfg.finetune)
    ft.name = cfg.name
    ft.training.learning_rate = float(best["learning_rate"])
    ft.lora.rank = int(best["rank"])
    ft.lora.alpha = float(best["alpha"])
    factory = ModelFactory(registry=reg, base=str(base_ref), method=ft.lora.method, lora=ft.lora,
                           target_modules=targets, seed=ft.training.seed)
    path = str(best["checkpoint_path"])
    storage = resolve_storage(path, storage_options or None)
    with tempfile.TemporaryDirectory(prefix="llmstack-sweep-") as tmp:
        local = Path(tmp) / "model.safetensors"
        storage.fs().get(storage.join("model.safetensors"), str(local))
        weights = load_file(str(local))
    metrics = {k: best[k] for k in ("eval_loss", "loss", "step") if best.get(k) is not None}
    extra = {"method": ft.lora.method, "sweep": {"trials": trials, "best": {k: best[k] for k in PARAMS}},
             "checkpoint": path, "target_modules": targets}
    return _register_adapter(reg, ft, factory, weights, base_ref, base_config, targets, metrics,
                             tensors.fingerprint, extra)
