"""Data parallelism for the per-worker loop: DDP or FSDP2, on CPU (gloo) or CUDA (nccl).

Ray Train has already created the process group when these run; with no process group (a plain
single-process run) every helper degrades to the local, non-distributed behaviour.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

STRATEGIES = ("ddp", "fsdp")


def dist_ready() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of this process; ``(0, 1)`` without a process group."""
    import torch.distributed as dist

    if dist_ready():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(values: list[float], device: Any) -> list[float]:
    """Sum a few scalars over all workers (one collective)."""
    import torch
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    if dist_ready() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor.tolist()


def decoder_layers(model: Any, layer_classes: tuple[str, ...] | None = None) -> list[Any]:
    """The FSDP wrap units: modules whose class is a decoder layer.

    ``layer_classes`` names them explicitly; otherwise the Hugging Face ``_no_split_modules`` of any
    submodule (the classes HF itself never splits: ``LlamaDecoderLayer``, ``GPT2Block``...), else classes
    named ``*DecoderLayer``, else the blocks of the model's largest stack of identical layers (a
    ``ModuleList`` whose items share one class), so any architecture gets one unit per layer.
    """
    names: set[str] = set(layer_classes or ())
    if not names:
        for module in model.modules():
            names.update(getattr(module, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    if not layers:
        layers = _repeated_blocks(model)
    return layers


def _repeated_blocks(model: Any) -> list[Any]:
    """The items of the ``ModuleList`` of same-class blocks holding the most parameters (empty if none)."""
    import torch

    best: list[Any] = []
    best_size = 0
    for module in model.modules():
        if not isinstance(module, torch.nn.ModuleList) or len(module) == 0:
            continue
        items = list(module)
        if len({type(item) for item in items}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if size > best_size:
            best, best_size = items, size
    return best


def wrap_model(model: Any, *, strategy: str, device: Any, layer_classes: tuple[str, ...] | None = None) -> Any:
    """Move ``model`` to ``device`` and wrap it for data parallelism.

    ``ddp``: ``DistributedDataParallel`` (gradients all-reduced, full replica per worker).
    ``fsdp``: FSDP2 ``fully_shard`` on each decoder layer, then on the root, so parameters,
    gradients and optimizer state are sharded across workers (fp32 master weights; autocast
    handles the compute dtype). Without a process group the model is returned unwrapped.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; supported: {', '.join(STRATEGIES)}")
    model.to(device)
    if not dist_ready():
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(model, layer_classes):
        fully_shard(layer)
    fully_shard(model)
    return model


def unwrap(model: Any) -> Any:
    """The user's module inside a DDP wrapper (FSDP2 shards in place, so it needs none)."""
    return getattr(model, "module", model) if type(model).__name__ == "DistributedDataParallel" else model


@contextlib.contextmanager
def no_grad_sync(model: Any, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce/reduce-scatter on non-final accumulation micro-steps."""
    if not enabled:
        yield
        return
    if type(model).__name__ == "DistributedDataParallel":
        with model.no_sync():
            yield
        return
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
        return
    yield


def clip_grad_norm(parameters: Iterable[Any], max_norm: float) -> float:
    """Clip the global gradient norm (DTensor-aware under FSDP2) and return the norm before clipping."""
    import torch

    params = [p for p in parameters if p.grad is not None]
    if not params:
        return 0.0
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def full_model_state(model: Any) -> dict[str, Any]:
    """The full (unsharded) model state dict on CPU, on rank 0; an empty dict elsewhere.

    A collective under DDP/FSDP: every rank must call it. Keys are the plain module's names
    (no ``module.`` prefix), so the result loads into an unwrapped model in one process.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def full_optimizer_state(model: Any, optimizer: Any) -> dict[str, Any]:
    """The full optimizer state keyed by parameter name, on rank 0 (collective, like :func:`full_model_state`)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, optimizer, options=options)


def load_full_optimizer_state(model: Any, optimizer: Any, state: dict[str, Any]) -> None:
    """Load a full, name-keyed optimizer state (every rank passes the same dict; FSDP re-shards it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def resolve_device(use_gpu: bool) -> Any:
    """This worker's device: Ray Train's assignment inside a Ray worker, else cuda:0 / cpu."""
    import torch

    if use_gpu:
        try:
            import ray.train.torch

            return ray.train.torch.get_device()
        except Exception:
            return torch.device("cuda", 0)
    return torch.device("cpu")
