"""Saving and registering models, and the pair-returning loaders kept for existing callers.

What a source is and how it loads is decided in :mod:`llmstack.models.artifact`; ``load_model``,
``load_tokenizer`` and ``resolve_model_source`` are thin wrappers over it.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmstack.errors import RegistryError
from llmstack.models.artifact import Artifact, describe_artifact, load_artifact, load_artifact_tokenizer

if TYPE_CHECKING:
    from llmstack.registry import ArtifactRef, Registry


@dataclass
class ResolvedSource:
    """Where a model source pointed: a local directory and, for registry refs, the exact ref."""

    directory: Path
    ref: ArtifactRef | None = None
    hub_id: str | None = None


def resolve_model_source(source: str, *, registry: Registry | None = None) -> ResolvedSource:
    """Turn ``source`` into a local directory: see :func:`llmstack.models.describe_artifact`."""
    artifact = describe_artifact(str(source), registry=registry)
    hub_id = artifact.source if artifact.identity.startswith("hub:") else None
    return ResolvedSource(directory=artifact.directory, ref=artifact.ref, hub_id=hub_id)


def load_tokenizer(source: str | Path | ArtifactRef | Artifact, *, registry: Registry | None = None) -> Any:
    """A ``transformers`` fast tokenizer from a registry ref, a directory or a hub id (an adapter's: its base's)."""
    return load_artifact_tokenizer(describe_artifact(_as_source(source), registry=registry))


def load_model(source: str | Path | ArtifactRef | Artifact, *, registry: Registry | None = None,
               dtype: str = "auto", with_tokenizer: bool = True) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` for inference or further training: :func:`load_artifact` as a pair.

    Example:
        >>> model, tokenizer = load_model("tiny-lm@production")  # doctest: +SKIP
    """
    loaded = load_artifact(_as_source(source), registry=registry, dtype=dtype, with_tokenizer=with_tokenizer)
    return loaded.model, loaded.tokenizer


def _as_source(source: str | Path | ArtifactRef | Artifact) -> str | ArtifactRef | Artifact:
    return str(source) if isinstance(source, Path) else source


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
