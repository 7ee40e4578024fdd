"""The per-worker training loop: one function, read top to bottom.

:func:`run_worker_loop` trains any causal LM described by a :class:`LoopSpec` on a dict of token
tensors. It runs unchanged in three places:

* inside each Ray Train worker (:func:`train_loop_per_worker`, used by ``train()`` and
  ``finetune_lora()``), where Ray has created the process group (gloo on CPU, nccl on CUDA);
* in a plain single process (tests, the overhead benchmark) with a :class:`LocalSession`;
* under DDP or FSDP2, with gradient accumulation, autocast, activation checkpointing, clipping,
  warmup + cosine LR, periodic eval, and checkpoints that resume bit-for-bit in data order.

Fine-tuning reuses it by passing its own ``model_factory`` (e.g. a base model wrapped by peft),
``loss_fn`` (e.g. distillation) and ``trainable`` selection; nothing here knows about LoRA.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmstack.config import LoopConfig
from llmstack.train import checkpoint as ckpt
from llmstack.train import parallel
from llmstack.train.sharding import BlockSampler, eval_indices, warmup_cosine
from llmstack.train.elastic import grad_accum_for

IGNORE_INDEX = -100
EMULATED_DEVICE_ENV = "LLMSTACK_EMULATED_DEVICE_S"  # benchmark hook: see _maybe_emulate_device

# --------------------------------------------------------------------------- what to train


def causal_lm_loss(model: Any, batch: dict[str, Any]) -> Any:
    """Next-token cross-entropy, *summed* over target tokens (the loop divides by the token count).

    ``batch["input_ids"]``: [B, T]; optional ``labels`` [B, T] (-100 = ignored, e.g. prompt tokens)
    and ``attention_mask`` [B, T]. Without labels every next token is a target.
    """
    import torch.nn.functional as F

    input_ids = batch["input_ids"]
    logits = model(input_ids=input_ids, attention_mask=batch.get("attention_mask"), use_cache=False).logits
    # Position t predicts token t+1: shift the labels, not the logits. Slicing [B, T, V] logits would
    # copy them (and zero-fill + copy their gradient); the last position gets target -100 instead.
    targets = next_token_targets(batch)  # [B, T]
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),  # fp32 softmax under autocast
                           ignore_index=IGNORE_INDEX, reduction="sum")


def next_token_targets(batch: dict[str, Any]) -> Any:
    """``[B, T]`` targets: position t's is token t+1's label; the last position's is -100."""
    import torch.nn.functional as F

    labels = batch.get("labels", batch["input_ids"])
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def count_target_tokens(batch: dict[str, Any]) -> int:
    """Tokens that :func:`causal_lm_loss` sums over (shifted labels that are not -100)."""
    labels = batch.get("labels", batch["input_ids"])
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


@dataclass
class LoopSpec:
    """What the loop trains. Everything here travels to Ray workers, so it must pickle
    (module-level functions, ``functools.partial``, small objects; not lambdas or closures over
    big tensors).

    Attributes:
        model_factory: builds the unwrapped model on the worker; must give identical weights on
            every rank (seed it). Called once per worker (re)start.
        loss_fn: ``(model, batch) -> summed loss`` over the tokens :func:`count_target_tokens`
            counts; the loop normalises by the global token count of the optimizer step.
        trainable: ``(param_name, param) -> bool``; None keeps ``requires_grad`` as the factory set it.
        checkpoint_trainable_only: store only trainable tensors (adapters); on resume the frozen
            rest comes from ``model_factory``.
        layer_classes: class names of the FSDP wrap units; None: auto-detect decoder layers.
        signature: identifies the architecture; stored beside the checkpoints, compared on resume.
        save_extra: ``(unwrapped_model, checkpoint_dir)`` on rank 0, to add files (e.g. adapter config).
    """

    model_factory: Callable[[], Any]
    loss_fn: Callable[[Any, dict[str, Any]], Any] = causal_lm_loss
    trainable: Callable[[str, Any], bool] | None = None
    checkpoint_trainable_only: bool = False
    layer_classes: tuple[str, ...] | None = None
    signature: dict[str, Any] = field(default_factory=dict)
    save_extra: Callable[[Any, Path], None] | None = None


# --------------------------------------------------------------------------- where results go


class Session:
    """Where the loop sends per-step records, metrics and checkpoints, and finds one to resume."""

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        yield None

    def log(self, record: dict[str, Any]) -> None:
        """Every step, rank 0 only; must not block."""

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, name: str | None) -> None:
        """Eval and checkpoint steps, every rank (a barrier on Ray Train)."""


class LocalSession(Session):
    """A plain-process session: per-step records and events (``started``) in memory, checkpoints under
    ``checkpoint_root``."""

    def __init__(self, checkpoint_root: str | Path | None = None) -> None:
        self.checkpoint_root = Path(checkpoint_root) if checkpoint_root else None
        self.records: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self.reports: list[dict[str, Any]] = []

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        found = []
        if self.checkpoint_root and self.checkpoint_root.is_dir():
            found = sorted(p for p in self.checkpoint_root.iterdir() if ckpt.is_complete(p))
        yield found[-1] if found else None

    def log(self, record: dict[str, Any]) -> None:
        (self.events if "event" in record else self.records).append(dict(record))

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, name: str | None) -> None:
        import shutil

        self.reports.append(dict(metrics))
        if checkpoint_dir is not None and self.checkpoint_root is not None and name:
            shutil.copytree(checkpoint_dir, self.checkpoint_root / name, dirs_exist_ok=True)


class RaySession(Session):
    """Ray Train: checkpoints through ``ray.train.report``; per-step records to a metrics actor."""

    def __init__(self, bus: Any = None) -> None:
        self.bus = bus

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as directory:
            yield Path(directory)

    def log(self, record: dict[str, Any]) -> None:
        if self.bus is not None:
            self.bus.push.remote(record)  # fire and forget

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, name: str | None) -> None:
        """Report, and after a checkpoint wait until Ray Train has committed it.

        ``ray.train.report`` returns once the checkpoint is uploaded, but Ray Train's controller registers it
        only at its next poll of the workers (every 2 s); a restart reads the latest *registered* checkpoint.
        Training on past an uncommitted checkpoint lets a node lost in that window cost two checkpoint
        intervals; waiting here (at most one poll) bounds what any restart loses to one interval.
        """
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name if checkpoint else None)
        if checkpoint is not None:
            ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)


# --------------------------------------------------------------------------- the loop


def run_worker_loop(spec: LoopSpec, train_data: dict[str, Any], eval_data: dict[str, Any] | None,
                    training: LoopConfig, *, strategy: str = "ddp", use_gpu: bool = False,
                    session: Session | None = None, global_batch: int | None = None) -> dict[str, Any]:
    """Train ``spec``'s model for ``training.max_steps`` optimizer steps; return the final metrics.

    Args:
        spec: model factory, loss and trainable selection (see :class:`LoopSpec`).
        train_data: ``{"input_ids": LongTensor[N, T], ...}`` (optional ``labels``, ``attention_mask``),
            the whole training set; this worker reads its own disjoint shard.
        eval_data: held-out tensors in the same layout, or None to skip evaluation.
        training: steps, batch sizes, LR schedule, precision, eval/checkpoint cadence, seed.
        strategy: ``"ddp"`` or ``"fsdp"`` (only matters with a process group of 2+ workers).
        use_gpu: train on this worker's CUDA device.
        session: where metrics and checkpoints go; a :class:`LocalSession` when None.
        global_batch: blocks per optimizer step to keep whatever the world size (an elastic run): the
            accumulation becomes ``ceil(global_batch / (world_size * micro_batch_size))``; None: the
            configured ``grad_accum_steps``.

    Effective batch = ``micro_batch_size * grad_accum_steps * world_size`` blocks (or ``global_batch``, rounded
    up to a whole number of micro-batches per worker). Each micro-batch's
    summed loss is scaled by ``world_size / tokens_in_step`` so that, after DDP/FSDP average the
    gradients over workers, the step's gradient is exactly that of the mean loss over every target
    token of the effective batch: accumulation is equivalent to a bigger batch.
    """
    import torch

    entered_at = time.time()  # this worker group's start (its worker-seconds begin here)
    session = session or LocalSession()
    rank, world_size = parallel.world()
    device = parallel.resolve_device(use_gpu)
    torch.manual_seed(training.seed + rank)  # dropout etc.; model init is seeded by the factory

    # 1. Model (restored weights if a checkpoint exists), parallel wrapper, optimizer, schedule.
    model = spec.model_factory()
    if spec.trainable is not None:
        for name, param in model.named_parameters():
            param.requires_grad_(bool(spec.trainable(name, param)))
    trainable_names = {n for n, p in model.named_parameters() if p.requires_grad}
    with session.latest_checkpoint() as directory:
        restored = _read_checkpoint(directory, rank) if directory is not None else None
    if restored is not None:
        _load_weights(model, restored["model"], trainable_only=spec.checkpoint_trainable_only)
    if training.activation_checkpointing:
        enable_activation_checkpointing(model, spec.layer_classes)
    model = parallel.wrap_model(model, strategy=strategy, device=device, layer_classes=spec.layer_classes)
    optimizer = build_optimizer(model, training)
    schedule = functools.partial(warmup_cosine, warmup_steps=training.warmup_steps,
                                 max_steps=training.max_steps, min_lr_ratio=training.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    scaler = torch.amp.GradScaler(device.type, enabled=training.precision == "fp16")
    state: dict[str, Any] = {"step": 0, "tokens": 0}
    if restored is not None:
        parallel.load_full_optimizer_state(model, optimizer, restored["optimizer"])
        scheduler.load_state_dict(restored["scheduler"])
        if restored["rng"] is not None:
            ckpt.set_rng_state(restored["rng"])
        state = restored["state"]
    if rank == 0:  # every start, restored or not: the driver counts restarts from these
        session.log({"event": "started", "step": state["step"], "time": entered_at, "workers": world_size})

    # 2. Data: this worker's disjoint shard, recomputed from (step, rank), so resuming needs no state.
    micro = training.micro_batch_size
    accumulation = training.grad_accum_steps if global_batch is None else grad_accum_for(
        global_batch=global_batch, world_size=world_size, micro_batch_size=micro)
    sampler = BlockSampler(len(train_data["input_ids"]), world_size=world_size, rank=rank,
                           per_step=micro * accumulation, seed=training.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    step, tokens_seen = int(state["step"]), int(state["tokens"])
    record: dict[str, Any] = dict(state.get("metrics", {}))
    model.train()
    device_s = float(os.environ.get(EMULATED_DEVICE_ENV) or 0.0)

    # 3. Optimizer steps.
    while step < training.max_steps:
        started, cpu_started = time.perf_counter(), time.process_time()
        lr = optimizer.param_groups[0]["lr"]
        indices = sampler.step_indices(step)
        micro_batches = [{k: v[idx].to(device, non_blocking=True) for k, v in train_data.items()}
                         for idx in indices.split(micro)]
        local_tokens = sum(count_target_tokens(b) for b in micro_batches)
        (step_tokens,) = parallel.all_reduce_sum([local_tokens], device)
        scale = world_size / max(step_tokens, 1.0)
        loss_sum = 0.0
        for i, batch in enumerate(micro_batches):
            final_micro_step = i == len(micro_batches) - 1
            with parallel.no_grad_sync(model, enabled=world_size > 1 and not final_micro_step):
                with autocast(training.precision, device):
                    micro_loss = spec.loss_fn(model, batch)
                scaler.scale(micro_loss * scale).backward()
            loss_sum += float(micro_loss.detach())
            _maybe_emulate_device(device_s)
        scaler.unscale_(optimizer)
        grad_norm = parallel.clip_grad_norm(params, training.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step += 1
        (global_loss_sum,) = parallel.all_reduce_sum([loss_sum], device)
        tokens_seen += int(step_tokens)
        elapsed = time.perf_counter() - started
        record = {"step": step, "epoch": sampler.epoch_of(step - 1), "loss": global_loss_sum / max(step_tokens, 1.0),
                  "lr": lr, "grad_norm": grad_norm, "tokens": tokens_seen, "step_time_s": elapsed,
                  "step_cpu_s": time.process_time() - cpu_started,  # this process's CPU time: robust to other load
                  "tokens_per_s": step_tokens / max(elapsed, 1e-9), "time": time.time(),
                  "workers": world_size, "grad_accum_steps": accumulation}

        final = step == training.max_steps
        do_eval = eval_data is not None and (step % training.eval_every == 0 or final)
        if do_eval:
            eval_loss = evaluate(model, spec, eval_data, training, device=device)
            record.update(eval_loss=eval_loss, perplexity=math.exp(min(eval_loss, 50.0)))
        if rank == 0:
            session.log(record)
        _maybe_inject_fault(step, rank, world_size)
        _maybe_pace()
        do_checkpoint = final or (training.checkpoint_every > 0 and step % training.checkpoint_every == 0)
        if do_checkpoint:
            with tempfile.TemporaryDirectory(prefix="llmstack-ckpt-") as tmp:
                state = {"step": step, "tokens": tokens_seen, "epoch": record["epoch"], "metrics": record,
                         "signature": spec.signature}
                save_checkpoint(Path(tmp), model=model, optimizer=optimizer, scheduler=scheduler, spec=spec,
                                trainable_names=trainable_names, state=state, rank=rank)
                session.report(record, Path(tmp), f"checkpoint_{step:06d}")
        elif do_eval:
            session.report(record, None, None)
    return record


# --------------------------------------------------------------------------- pieces of the loop


def autocast(precision: str, device: Any) -> contextlib.AbstractContextManager[Any]:
    """bf16/fp16 autocast for the forward pass; parameters (master weights) stay fp32."""
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def build_optimizer(model: Any, training: LoopConfig) -> Any:
    """AdamW over trainable parameters; no weight decay on 1-d tensors (norm scales, biases)."""
    import torch

    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": training.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    params = decay + no_decay
    # One fused kernel per step (CPU and CUDA) instead of ~10 elementwise passes per tensor: the same
    # update, several times faster on a large model. DTensors (FSDP2 shards) keep the default path.
    fused = bool(params) and all(type(p) is torch.nn.Parameter and p.device.type in ("cpu", "cuda")
                                 and p.dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64)
                                 for p in params)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=training.learning_rate, betas=(0.9, 0.95),
                             fused=fused or None)


def enable_activation_checkpointing(model: Any, layer_classes: tuple[str, ...] | None = None) -> None:
    """Recompute each decoder layer in backward (non-reentrant, so it composes with DDP/FSDP2)."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        if getattr(model, "config", None) is not None:
            model.config.use_cache = False
        return
    if hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if getattr(model, "config", None) is not None:
            model.config.use_cache = False
        return
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    layers = {id(m) for m in parallel.decoder_layers(model, layer_classes)}
    apply_activation_checkpointing(model, check_fn=lambda m: id(m) in layers)


def evaluate(model: Any, spec: LoopSpec, eval_data: dict[str, Any], training: LoopConfig, *,
             device: Any) -> float:
    """Mean held-out loss per target token over up to ``eval_batches`` micro-batches per worker."""
    import torch

    rank, world_size = parallel.world()
    micro = training.micro_batch_size
    indices = torch.tensor(eval_indices(len(eval_data["input_ids"]), world_size=world_size, rank=rank,
                                        max_blocks=training.eval_batches * micro))
    total, tokens = 0.0, 0
    model.eval()
    with torch.no_grad():
        for idx in indices.split(micro):
            batch = {k: v[idx].to(device) for k, v in eval_data.items()}
            with autocast(training.precision, device):
                total += float(spec.loss_fn(model, batch))
            tokens += count_target_tokens(batch)
    model.train()
    total, tokens_all = parallel.all_reduce_sum([total, tokens], device)
    return total / max(tokens_all, 1.0)


def save_checkpoint(directory: Path, *, model: Any, optimizer: Any, scheduler: Any, spec: LoopSpec,
                    trainable_names: set[str], state: dict[str, Any], rank: int) -> None:
    """Write a checkpoint (see :mod:`llmstack.train.checkpoint`); a collective on every rank."""
    model_state = parallel.full_model_state(model)  # full tensors on rank 0 only
    optimizer_state = parallel.full_optimizer_state(model, optimizer)
    if rank == 0:
        if spec.checkpoint_trainable_only:
            model_state = {k: v for k, v in model_state.items() if k in trainable_names}
        ckpt.save_tensors(model_state, directory / ckpt.MODEL_FILE)
        tensors, groups = ckpt.split_optimizer_state(optimizer_state)
        ckpt.save_tensors(tensors, directory / "optimizer.safetensors")
        ckpt.write_json(groups, directory / "optimizer.json")
        ckpt.write_json(scheduler.state_dict(), directory / "scheduler.json")
        inner = parallel.unwrap(model)
        config = getattr(inner, "config", None)
        if config is not None and hasattr(config, "to_json_file") and not spec.checkpoint_trainable_only:
            config.to_json_file(str(directory / "config.json"))
        if spec.save_extra is not None:
            spec.save_extra(inner, directory)
        ckpt.write_json(state, directory / ckpt.STATE_FILE)  # last: marks the checkpoint complete
    ckpt.save_tensors(ckpt.rng_state(), directory / f"rng_rank{rank}.safetensors")


def _read_checkpoint(directory: Path, rank: int) -> dict[str, Any]:
    """Everything needed to resume, read into memory (the directory may be a temporary download)."""
    if not ckpt.is_complete(directory):
        raise RuntimeError(f"checkpoint {directory} is incomplete (no {ckpt.STATE_FILE}); delete it to restart")
    rng_file = directory / f"rng_rank{rank}.safetensors"
    return {
        "model": ckpt.load_tensors(directory / ckpt.MODEL_FILE),
        "optimizer": ckpt.join_optimizer_state(ckpt.load_tensors(directory / "optimizer.safetensors"),
                                               ckpt.read_json(directory / "optimizer.json")),
        "scheduler": ckpt.read_json(directory / "scheduler.json"),
        "rng": ckpt.load_tensors(rng_file) if rng_file.is_file() else None,
        "state": ckpt.read_json(directory / ckpt.STATE_FILE),
    }


def _load_weights(model: Any, weights: dict[str, Any], *, trainable_only: bool) -> None:
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or (missing and not trainable_only):
        raise RuntimeError(f"checkpoint does not match the model: missing {sorted(missing)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]}")


def _maybe_pace() -> None:
    """Test hook: sleep ``LLMSTACK_STEP_DELAY_S`` seconds after each step (outside its timing), so that a test of
    cluster events (a node joining or lost) finds the run still going on a fast machine."""
    delay = float(os.environ.get("LLMSTACK_STEP_DELAY_S") or 0.0)
    if delay > 0:
        time.sleep(delay)


def _maybe_emulate_device(seconds: float) -> None:
    """Benchmark hook: sleep ``LLMSTACK_EMULATED_DEVICE_S`` seconds per micro-batch inside the step's timing,
    standing for accelerator work a CPU machine does not have. A fleet benchmark on a few shared cores then
    measures scheduling (queueing, node and worker-group starts, resizes), not CPU contention between the
    fake nodes; a step on fewer workers takes proportionally longer (more accumulation micro-batches)."""
    if seconds > 0:
        time.sleep(seconds)


def _maybe_inject_fault(step: int, rank: int, world_size: int) -> None:
    """Test hook: kill this worker process once, after ``LLMSTACK_FAULT_AT_STEP``.

    Needs ``LLMSTACK_FAULT_FLAG`` (a file path; the fault fires only while it does not exist, and
    creates it) so a restarted worker does not fail again. ``LLMSTACK_FAULT_RANK`` picks the worker
    (default: the last).
    """
    at, flag = os.environ.get("LLMSTACK_FAULT_AT_STEP"), os.environ.get("LLMSTACK_FAULT_FLAG")
    if not at or not flag or int(at) != step:
        return
    if rank != int(os.environ.get("LLMSTACK_FAULT_RANK", world_size - 1)) or Path(flag).exists():
        return
    Path(flag).write_text(f"killed rank {rank} after step {step}\n", encoding="utf-8")
    os._exit(1)


# --------------------------------------------------------------------------- Ray Train entry point


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """The function each Ray Train worker runs (``TorchTrainer(train_loop_per_worker, ...)``).

    ``config`` keys: ``spec`` (LoopSpec), ``train_data`` / ``eval_data`` (``[ObjectRef]`` of tensor
    dicts, shipped through the object store; eval may be ``None``), ``training`` (LoopConfig),
    ``strategy``, ``use_gpu``, ``threads`` (torch intra-op threads), ``bus`` (metrics actor or None).
    """
    import ray
    import torch

    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    train_data = ray.get(config["train_data"][0])
    eval_data = ray.get(config["eval_data"][0]) if config.get("eval_data") else None
    return run_worker_loop(config["spec"], train_data, eval_data, config["training"],
                           strategy=config["strategy"], use_gpu=config["use_gpu"],
                           session=RaySession(config.get("bus")), global_batch=config.get("global_batch"))
