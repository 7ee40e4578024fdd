"""Loading quantized versions (and, transparently, plain float models) for validate and serve."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmstack.errors import ModelLoadError
from llmstack.quantize._base import read_recipe

if TYPE_CHECKING:
    from llmstack.registry import ArtifactRef, Registry


def is_quantized_dir(directory: str | Path) -> bool:
    """True when ``directory`` holds a model quantized by llmstack or by a transformers quantizer."""
    import json

    directory = Path(directory)
    if read_recipe(directory) is not None:
        return True
    config = directory / "config.json"
    if config.is_file():
        try:
            return "quantization_config" in json.loads(config.read_text(encoding="utf-8"))
        except ValueError:
            return False
    return False


def load_directory(directory: str | Path, *, source: str | None = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from a quantized model directory written by :func:`quantize`."""
    from transformers import AutoTokenizer

    from llmstack.quantize._dispatch import get_backend

    directory = Path(directory)
    shown = source or str(directory)
    recipe = read_recipe(directory)
    if recipe is None:
        raise ModelLoadError(f"{shown} is not a quantized model: it has no quantization.json")
    if not any(directory.glob("*.safetensors")):
        raise ModelLoadError(f"{shown} holds no .safetensors weights; llmstack loads safetensors only")
    backend = get_backend(recipe["method"])
    try:
        model = backend.load(directory, recipe)
    except Exception as exc:
        raise ModelLoadError(f"cannot rebuild the {recipe['method']} model of {shown}: {type(exc).__name__}: {exc}") \
            from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
    except Exception as exc:
        raise ModelLoadError(f"{shown} has no usable tokenizer ({exc})") from None
    model.eval()
    return model, tokenizer


def load_quantized(registry: Registry | None, ref: str | ArtifactRef) -> tuple[Any, Any]:
    """Load a quantized registry version as ``(model, tokenizer)``, ready for ``generate``.

    Args:
        registry: the registry holding ``ref`` (None: the default registry).
        ref: ``name@vN``, ``name@alias`` or ``name`` (latest) of a version of kind ``quantized``.

    Raises:
        ArtifactNotFoundError: no such version.
        ModelLoadError: the version is not a quantized model, or cannot be rebuilt.

    Example:
        >>> model, tokenizer = load_quantized(Registry(), "tiny-lm-int8@v1")  # doctest: +SKIP
        >>> ids = tokenizer("def ", return_tensors="pt").input_ids
        >>> model.generate(ids, max_new_tokens=8)  # doctest: +SKIP
    """
    from llmstack.registry import Registry

    registry = registry or Registry()
    resolved = registry.resolve(ref)
    return load_directory(registry.fetch(resolved), source=str(resolved))


def load_any(source: str | ArtifactRef, registry: Registry | None = None, *,
             dtype: str = "float32") -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` whether ``source`` is quantized or a plain float model.

    ``source`` is a registry reference, a local directory or a hub id, as for
    :func:`llmstack.models.load_model`; quantized versions are rebuilt from their recipe (``dtype``
    then comes from the recipe), everything else goes to ``load_model(source, dtype=dtype)``.

    Example:
        >>> model, tokenizer = load_any("tiny-lm@production")  # doctest: +SKIP
    """
    from llmstack.models.loading import load_model, resolve_model_source

    resolved = resolve_model_source(str(source), registry=registry)
    if read_recipe(resolved.directory) is not None:
        return load_directory(resolved.directory, source=str(resolved.ref or source))
    return load_model(str(resolved.directory), dtype=dtype)
