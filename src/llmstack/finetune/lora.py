"""``finetune_lora()``: LoRA, QLoRA, DoRA, BitFit (biases and normalisation parameters) or full fine-tuning.

The driver resolves the base to a registry version, checks everything that can fail before workers
start, tokenizes the instruction data once, then hands a :class:`~llmstack.train.loop.LoopSpec`
(a :class:`~llmstack.finetune.methods.ModelFactory` plus "checkpoint trainable tensors only") to
the shared Ray Train engine :func:`llmstack.train.run_training`: DDP/FSDP, accumulation, mixed
precision, checkpoints, resume and fault tolerance are train()'s, not a copy. The final checkpoint
holds the full (all-rank, unsharded) trainable tensors; they become a peft adapter registered with
the base as its lineage parent.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmstack._verbs import Overrides, open_registry, read_settings
from llmstack.config import FinetuneConfig, to_dict
from llmstack.errors import ConfigError
from llmstack.finetune.methods import (ADAPTER_METHODS, METHOD_DESCRIPTIONS, ModelFactory, base_artifact,
                                       check_bitsandbytes, count_trainable, resolve_target_modules, training_device,
                                       training_dtype)

if TYPE_CHECKING:
    from llmstack.registry import ArtifactRef, Registry


@dataclass
class FinetuneResult:
    """What :func:`finetune_lora` returns.

    Attributes:
        ref: the registered result: kind ``adapter`` (lora/qlora/dora/bitfit) or ``model`` (full).
        base: the base model version it was trained on (its lineage parent).
        method: the method used.
        metrics: final ``loss``/``eval_loss``, ``eval_loss_before`` (the base on the same held-out
            answers), ``trainable_params``, ``total_params``, ``trainable_fraction``, tokens, time.
        history: per-step metric records.
        merged_ref: the merged model (kind ``model``) when ``lora.merge`` was set.
        run_dir: the run directory in checkpoint storage.
        checkpoint_path: the final checkpoint in storage.
    """

    ref: ArtifactRef
    base: ArtifactRef
    method: str
    metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    merged_ref: ArtifactRef | None = None
    run_dir: str = ""
    checkpoint_path: str = ""

    def __str__(self) -> str:
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.metrics.items())
        merged = f", merged {self.merged_ref}" if self.merged_ref else ""
        return f"{self.ref} ({self.method} on {self.base}{merged}; {shown})"


# --------------------------------------------------------------------------- shared driver helpers


def ensure_base_ref(source: str, registry: Registry, *, name: str | None = None) -> ArtifactRef:
    """The base as a registry version: a ref is resolved; a directory, hub id or GGUF file is imported
    (:func:`llmstack.models.import_model`) as ``name``, by default the model's own name (directory or
    file stem).

    Registering an outside base gives every adapter a lineage parent to check against; an identical
    copy (same weight hashes, or the same GGUF file) reuses the existing version instead of adding one.
    """
    from llmstack.models import describe_artifact, import_model
    from llmstack.models.gguf import is_gguf

    if is_gguf(source):
        return import_model(source, name=name, registry=registry, registered_by="finetune (outside base)")
    artifact = describe_artifact(str(source), registry=registry)
    if artifact.ref is not None:
        manifest = registry.manifest(artifact.ref)
        if manifest.kind != "model":
            hint = " (merge it first with llmstack.finetune.merge_adapter)" if manifest.kind == "adapter" else ""
            raise ConfigError(f"base: {artifact.ref} is a {manifest.kind}, expected a model{hint}")
        return artifact.ref
    return import_model(artifact.source, name=name, registry=registry, registered_by="finetune (outside base)")


def check_positions(base_config: Any, block_size: int, where: str) -> None:
    positions = getattr(base_config, "max_position_embeddings", None)
    if positions is not None and block_size > positions:
        raise ConfigError(f"data.block_size: {block_size} tokens exceed the {positions} positions of {where}; "
                          f"set data.block_size<={positions}")


def evaluate_in_process(factory: Any, eval_data: dict[str, Any] | None, training: Any, loss_fn: Any = None, *,
                        model: Any = None) -> float | None:
    """Held-out loss of the untrained starting point (``model``, else a fresh ``factory()``), computed
    on the driver with the loop's own ``evaluate``."""
    if eval_data is None:
        return None
    import torch

    from llmstack.train.loop import LoopSpec, causal_lm_loss, evaluate

    model = factory() if model is None else model
    spec = LoopSpec(model_factory=factory, loss_fn=loss_fn or causal_lm_loss)
    return float(evaluate(model, spec, eval_data, training, device=torch.device("cpu")))


def default_storage(registry: Registry, configured: str | None) -> str:
    from llmstack.train.driver import default_storage_path

    return configured or default_storage_path(registry)


def summarize(outcome: Any, *, before: float | None, trainable: int, total: int) -> dict[str, Any]:
    from llmstack.train.driver import final_metrics

    metrics = final_metrics(outcome)
    metrics.update(trainable_params=trainable, total_params=total,
                   trainable_fraction=trainable / max(total, 1))
    if before is not None:
        metrics["eval_loss_before"] = before
        if "eval_loss" in metrics:
            metrics["eval_loss_improvement"] = before - metrics["eval_loss"]
    return {k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v) for k, v in metrics.items()}


def load_trainable(checkpoint_dir: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(Path(checkpoint_dir) / "model.safetensors"))


# --------------------------------------------------------------------------- finetune_lora()


def finetune_lora(config: FinetuneConfig | Mapping[str, Any] | str | Path | None = None, *,
                  registry: Registry | str | None = None, overrides: Overrides = (), progress: bool = True,
                  **settings: Any) -> FinetuneResult:
    """Fine-tune the model ``base`` on instruction data with the configured method, on Ray Train.

    Methods (``lora.method``): ``lora``, ``qlora`` (NF4 base via bitsandbytes, double quantization),
    ``dora``, ``bitfit`` (every bias and normalisation parameter, chosen per architecture by
    :func:`~llmstack.finetune.methods.bitfit_plan`: norm scales alone on bias-free models such as LLaMA)
    and ``full``.
    The loss covers response tokens only; ``packing`` concatenates examples per row. The held-out
    split of the data gives ``eval_loss`` (and ``eval_loss_before``, the base on the same answers).

    Args:
        config: a :class:`FinetuneConfig`, a mapping of its fields, or a YAML file path (None: defaults).
        registry: a Registry or URL (default ``config.registry``, then ``$LLMSTACK_REGISTRY``).
        overrides: ``key.path=value`` strings (or a mapping of key paths to values) applied on top of ``config``.
        progress: show the progress bar.
        **settings: top-level config keys as values, applied last: ``base="tiny-lm@v1"`` (the model: a
            registry ref, local HF directory or hub id), ``data={"source": "builtin:stdlib-qa"}``,
            ``lora={"rank": 8}`` (mappings merge into their section).

    Returns:
        A :class:`FinetuneResult`: ``.ref`` is the adapter (or, for ``full``, model) registered with the
        base as lineage parent, plus metrics; ``merged_ref`` too when ``lora.merge`` is set.

    Raises:
        ConfigError: unknown target modules (those that exist are listed), rank <= 0, missing base,
            block size beyond the base's positions, qlora with FSDP.
        DataError: unreadable data or a row without a response (file and line named).
        ResourceError: qlora where bitsandbytes cannot run (says why); a cluster too small.

    Example:
        >>> import llmstack
        >>> result = llmstack.finetune_lora(base="tiny-lm@v1", lora={"rank": 8},
        ...                                 training={"max_steps": 50})  # doctest: +SKIP
        >>> result.ref, result.metrics["eval_loss"] < result.metrics["eval_loss_before"]  # doctest: +SKIP
    """
    from llmstack.finetune.data import instruction_tensors
    from llmstack.train import run_training
    from llmstack.train.checkpoint import model_signature

    cfg, _ = read_settings("finetune_lora", FinetuneConfig, config, overrides, settings)
    if not cfg.base:
        raise ConfigError("base: no base model given; set base (finetune_lora(base=...), `llmstack finetune MODEL` "
                          "or base: in the config): a registry ref such as tiny-lm@v1, a local HF directory or a hub id")
    method = cfg.lora.method
    if method == "qlora":
        if cfg.scaling.strategy == "fsdp":
            raise ConfigError("scaling.strategy: qlora cannot shard 4-bit bitsandbytes weights with FSDP; "
                              "use scaling.strategy=ddp (the NF4 base is already small)")
        check_bitsandbytes("cuda" if cfg.scaling.use_gpu else "cpu")
    reg = open_registry(registry, cfg.registry)

    # The base, as a registry version (its lineage parent), read once here: the checks that need its
    # config, the target modules and the held-out loss before training all use this one copy.
    from llmstack.models import load_artifact

    base_ref = ensure_base_ref(cfg.base, reg)  # an outside base is registered under its own name
    base = load_artifact(base_artifact(str(base_ref), registry=reg, method=method),
                         dtype=training_dtype(method, "auto"),
                         device=training_device(method, use_gpu=cfg.scaling.use_gpu))
    base_model, tokenizer = base.model, base.tokenizer
    check_positions(base_model.config, cfg.data.block_size, str(base_ref))
    targets = None
    if method in ("lora", "qlora", "dora"):
        targets = resolve_target_modules(base_model, cfg.lora.target_modules)
    signature = {**model_signature(base_model.config), "finetune_method": method, "base": str(base_ref),
                 "rank": cfg.lora.rank, "alpha": cfg.lora.alpha, "target_modules": targets}
    base_config = base_model.config

    tensors = instruction_tensors(cfg.data.source, tokenizer, max_length=cfg.data.block_size, packing=cfg.packing,
                                  max_rows=cfg.data.max_documents, storage_options=cfg.data.storage_options or None,
                                  columns=cfg.data.columns or None, chat_template=cfg.data.chat_template,
                                  train_on_inputs=cfg.data.train_on_inputs)
    factory = ModelFactory(registry=reg, base=str(base_ref), method=method, lora=cfg.lora, target_modules=targets,
                           seed=cfg.training.seed, use_gpu=cfg.scaling.use_gpu)
    from llmstack.train.driver import check_batch

    check_batch(cfg.training, cfg.scaling, num_blocks=len(tensors.train["input_ids"]))
    start_model = factory.apply(base_model)  # what factory() builds on a worker, from the copy read above
    trainable, total = count_trainable(start_model)
    before = evaluate_in_process(factory, tensors.eval, cfg.training, model=start_model)
    del start_model, base_model

    from llmstack.train.loop import LoopSpec

    spec = LoopSpec(model_factory=factory, checkpoint_trainable_only=method != "full", signature=signature)
    from llmstack.train.tracking import track_run

    with track_run(cfg.tracking, run_name=cfg.name, params=to_dict(cfg), kind=f"finetune {method}") as tracker:
        outcome = run_training(spec, tensors.train, tensors.eval, training=cfg.training, scaling=cfg.scaling,
                               run_name=cfg.name, storage=default_storage(reg, cfg.storage_path),
                               storage_options=cfg.storage_options or None, progress=progress,
                               desc=f"finetune {method}", on_record=tracker.log_step)
        try:
            metrics = summarize(outcome, before=before, trainable=trainable, total=total)
            extra = {"method": method, "description": METHOD_DESCRIPTIONS[method], "run_dir": outcome.run_dir,
                     "checkpoint": outcome.checkpoint_path, "target_modules": targets, "packing": cfg.packing,
                     "train_rows": tensors.num_train_rows, "eval_rows": tensors.num_eval_rows,
                     "data_source": cfg.data.source, "recoveries": outcome.recoveries}
            weights = load_trainable(outcome.checkpoint_dir)
            if method == "full":
                ref = _register_full(reg, cfg, factory, weights, tokenizer, base_ref, metrics, tensors.fingerprint,
                                     extra)
            else:
                ref = _register_adapter(reg, cfg, factory, weights, base_ref, base_config, targets, metrics,
                                        tensors.fingerprint, extra)
        finally:
            outcome.cleanup()
        tracker.finish(metrics, registry_version=str(ref))
    merged = None
    if cfg.lora.merge and method in ADAPTER_METHODS:
        from llmstack.finetune.adapters import merge_adapter

        merged = merge_adapter(reg, ref, name=f"{cfg.name}-merged")
    return FinetuneResult(ref=ref, base=base_ref, method=method, metrics=metrics, history=outcome.history,
                          merged_ref=merged, run_dir=outcome.run_dir, checkpoint_path=outcome.checkpoint_path)


def _register_adapter(reg: Registry, cfg: FinetuneConfig, factory: ModelFactory, weights: dict[str, Any],
                      base_ref: ArtifactRef, base_config: Any, targets: list[str] | None, metrics: dict[str, Any],
                      fingerprint: str, extra: dict[str, Any]) -> ArtifactRef:
    from llmstack.finetune.adapters import base_weight_hashes, write_adapter

    with tempfile.TemporaryDirectory(prefix="llmstack-adapter-") as tmp:
        write_adapter(Path(tmp), method=cfg.lora.method, trainable=weights, base_ref=str(base_ref),
                      base_hashes=base_weight_hashes(reg, base_ref), base_config=base_config, factory=factory,
                      target_modules=targets)
        return reg.register(cfg.name, tmp, kind="adapter", parents=[str(base_ref)], config=to_dict(cfg),
                            metrics=metrics, data_fingerprint=fingerprint, extra=extra)


def _register_full(reg: Registry, cfg: FinetuneConfig, factory: ModelFactory, weights: dict[str, Any],
                   tokenizer: Any, base_ref: ArtifactRef, metrics: dict[str, Any], fingerprint: str,
                   extra: dict[str, Any]) -> ArtifactRef:
    from llmstack.models import describe_artifact, register_model
    from llmstack.models.artifact import stored_dtype
    from llmstack.models.loading import cast_parameters

    model = factory()
    model.load_state_dict(weights)
    model.eval()
    # Trained in float32 master weights (training_dtype), written in the base's own dtype.
    saved_dtype = stored_dtype(describe_artifact(base_ref, registry=reg).directory)
    cast_parameters(model, saved_dtype)
    return register_model(reg, cfg.name, model, tokenizer, kind="model", parents=[str(base_ref)],
                          config=to_dict(cfg), metrics=metrics, data_fingerprint=fingerprint,
                          extra={**extra, "dtype": saved_dtype})
