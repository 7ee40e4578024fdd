"""Saving and registering models, loading a tokenizer alone, and dtype helpers.

What a source is and how it loads is decided in :mod:`llmstack.models.artifact` (``load_artifact``).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmstack.errors import RegistryError
from llmstack.models.artifact import Artifact, describe_artifact, load_artifact_tokenizer

if TYPE_CHECKING:
    from llmstack.registry import ArtifactRef, Registry


def load_tokenizer(source: str | Path | ArtifactRef | Artifact, *, registry: Registry | None = None) -> Any:
    """A ``transformers`` fast tokenizer from what ``source`` names (an adapter's: its own, else its base's);
    for tokenizer-only artifacts, and where the weights are not wanted. Models load with
    :func:`~llmstack.models.load_artifact`."""
    source = str(source) if isinstance(source, Path) else source
    return load_artifact_tokenizer(describe_artifact(source, registry=registry))


def save_model(model: Any, tokenizer: Any, directory: str | Path) -> Path:
    """Write ``model`` (safetensors) and ``tokenizer`` as a Hugging Face directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    return directory


def register_model(registry: Registry, name: str, model: Any, tokenizer: Any, *, kind: str = "model",
                   parents: list[str] | tuple[str, ...] = (), config: Any = None,
                   metrics: dict[str, Any] | None = None, data_fingerprint: str | None = None,
                   extra: dict[str, Any] | None = None) -> ArtifactRef:
    """Save ``model`` and ``tokenizer`` to a scratch directory and register them as a new version."""
    with tempfile.TemporaryDirectory(prefix="llmstack-model-") as tmp:
        save_model(model, tokenizer, tmp)
        try:
            return registry.register(name, tmp, kind=kind, parents=list(parents), config=config,
                                     metrics=metrics, data_fingerprint=data_fingerprint, extra=extra)
        except OSError as exc:
            raise RegistryError(f"cannot write {name} to the registry: {exc}") from None


def model_dtype_name(model: Any) -> str:
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def cast_parameters(model: Any, dtype: str) -> Any:
    """``model`` with every floating-point parameter in ``dtype`` (``float32``, ``bfloat16``...) and its config
    saying so. Buffers keep theirs (rotary frequencies stay float32, as ``from_pretrained`` leaves them), and
    unlike ``model.to`` it works on a model that was loaded quantized and then dequantized."""
    import torch

    target = getattr(torch, dtype)
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != target:
            param.data = param.data.to(target)
    if getattr(model, "config", None) is not None:
        model.config.dtype = target
    return model


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
