"""Checkpoint files: everything is safetensors or JSON, nothing is pickled.

A checkpoint directory holds::

    model.safetensors       full (unsharded) weights, HF names: loads in one process
    config.json             the HF model config, when the model has one (so the dir is an HF model dir)
    optimizer.safetensors   optimizer tensors, keys "<param name>/<state key>"
    optimizer.json          optimizer param groups (hyperparameters, param names)
    scheduler.json          LR scheduler state
    rng_rank<R>.safetensors each worker's torch RNG state
    state.json              step, epoch, tokens, metrics, model signature: written last

``state.json`` is written after every other file of rank 0, so a directory without it is incomplete.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MODEL_FILE = "model.safetensors"
STATE_FILE = "state.json"
SIGNATURE_FILE = "model_signature.json"


def save_tensors(tensors: dict[str, Any], path: Path) -> None:
    """Write a flat name -> tensor dict as safetensors (shared storages are cloned apart)."""
    from safetensors.torch import save_file

    seen: set[int] = set()
    clean: dict[str, Any] = {}
    for name, tensor in tensors.items():
        tensor = tensor.detach().cpu().contiguous()
        if tensor.numel() and tensor.data_ptr() in seen:
            tensor = tensor.clone()
        if tensor.numel():
            seen.add(tensor.data_ptr())
        clean[name] = tensor
    save_file(clean, str(path))


def load_tensors(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(path))


def write_json(data: Any, path: Path) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=True, default=_jsonable), encoding="utf-8")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):  # 0-d tensors / numpy scalars
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint's JSON")


def split_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Full, name-keyed optimizer state -> (flat tensors, JSON-safe param groups)."""
    import torch

    tensors: dict[str, Any] = {}
    for param_name, entries in state.get("state", {}).items():
        for key, value in entries.items():
            tensors[f"{param_name}/{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items()}
              for group in state.get("param_groups", [])]
    return tensors, groups


def join_optimizer_state(tensors: dict[str, Any], groups: list[dict[str, Any]]) -> dict[str, Any]:
    """Inverse of :func:`split_optimizer_state`."""
    state: dict[str, dict[str, Any]] = {}
    for flat, value in tensors.items():
        param_name, _, key = flat.rpartition("/")
        state.setdefault(param_name, {})[key] = value
    for group in groups:
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
    return {"state": state, "param_groups": groups}


def rng_state() -> dict[str, Any]:
    import torch

    tensors = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["cuda"] = torch.cuda.get_rng_state()
    return tensors


def set_rng_state(tensors: dict[str, Any]) -> None:
    import torch

    torch.set_rng_state(tensors["cpu"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])


def is_complete(directory: Path) -> bool:
    return (Path(directory) / STATE_FILE).is_file() and (Path(directory) / MODEL_FILE).is_file()


def signature_differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable differences between two model signatures ('hidden_size: 128 (stored) vs 256')."""
    keys = sorted(set(stored) | set(current))
    return [f"{k}: {stored.get(k)!r} (stored) vs {current.get(k)!r} (now)" for k in keys
            if stored.get(k) != current.get(k)]


def model_signature(config: Any) -> dict[str, Any]:
    """What makes checkpoints of two models interchangeable: the architecture, from an HF config."""
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    keys = ("model_type", "architectures", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "intermediate_size", "vocab_size", "max_position_embeddings",
            "tie_word_embeddings", "hidden_act")
    return {k: data.get(k) for k in keys if k in data}
