"""Load a causal LM and its tokenizer from a registry ref, a local HF directory or a hub id.

All three sources end up as a local directory handed to ``transformers``; weights are read as
safetensors only (``use_safetensors=True``), so nothing is unpickled.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmstack.errors import ArtifactNotFoundError, ModelLoadError, RegistryError

if TYPE_CHECKING:
    from llmstack.registry import ArtifactRef, Registry

_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}


@dataclass
class ResolvedSource:
    """Where a model source pointed: a local directory and, for registry refs, the exact ref."""

    directory: Path
    ref: ArtifactRef | None = None
    hub_id: str | None = None


def resolve_model_source(source: str, *, registry: Registry | None = None) -> ResolvedSource:
    """Turn ``source`` into a local directory: registry ref first, then a directory, then a hub id."""
    from llmstack.registry import ArtifactRef, Registry

    path = Path(source).expanduser()
    if path.is_dir():
        return ResolvedSource(directory=path)
    if ArtifactRef.looks_like(source):
        registry = registry or Registry()
        try:
            ref = registry.resolve(source)
        except ArtifactNotFoundError:
            if "@" in source:
                raise
        else:
            return ResolvedSource(directory=registry.fetch(ref), ref=ref)
    if "/" in source and not source.startswith(("/", ".", "~")):
        return ResolvedSource(directory=_fetch_hub(source), hub_id=source)
    raise ModelLoadError(
        f"model source {source!r} is neither a registry artifact, a local directory nor a hub id "
        "(org/name); run `llmstack registry list` to see what is registered")


def _fetch_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as exc:  # offline, unknown repo, gated repo: all the same to the user
        raise ModelLoadError(
            f"cannot fetch hub model {repo_id!r} ({type(exc).__name__}); this machine may be offline. "
            "Download it elsewhere (huggingface-cli download) and pass the local directory instead, "
            "e.g. model.source=/path/to/model") from None


def load_tokenizer(source: str | Path, *, registry: Registry | None = None) -> Any:
    """A ``transformers`` fast tokenizer from a registry ref, a directory or a hub id."""
    from transformers import AutoTokenizer

    directory = resolve_model_source(str(source), registry=registry).directory
    try:
        return AutoTokenizer.from_pretrained(str(directory))
    except Exception as exc:
        raise ModelLoadError(f"cannot load a tokenizer from {source} ({exc})") from None


def load_model(source: str | Path, *, registry: Registry | None = None, dtype: str = "float32",
               with_tokenizer: bool = True) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` for inference or further training.

    Example:
        >>> model, tokenizer = load_model("tiny-lm@production")  # doctest: +SKIP
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    resolved = resolve_model_source(str(source), registry=registry)
    directory = resolved.directory
    if (directory / "quantization.json").is_file():  # written by llmstack.quantize: rebuild from its recipe
        from llmstack.quantize._io import load_directory

        model, tokenizer = load_directory(directory, source=str(resolved.ref or source))
        return model, (tokenizer if with_tokenizer else None)
    if not (directory / "config.json").is_file():
        raise ModelLoadError(f"{source} has no config.json: not a model directory ({directory})")
    if not any(directory.glob("*.safetensors")):
        raise ModelLoadError(f"{source} holds no .safetensors weights; llmstack loads safetensors only")
    torch_dtype = getattr(torch, _DTYPES.get(dtype, dtype))
    try:
        model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch_dtype, use_safetensors=True)
    except Exception as exc:
        raise ModelLoadError(f"cannot load model from {source}: {exc}") from None
    tokenizer = None
    if with_tokenizer:
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(directory))
        except Exception as exc:
            raise ModelLoadError(f"{source} has no usable tokenizer ({exc})") from None
    model.eval()
    return model, tokenizer


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


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
