"""Loading quantized versions: the backend rebuild that :mod:`llmstack.models` calls, and two public wrappers.

``llmstack.models.load_artifact`` decides what a source is and calls :func:`rebuild_quantized` for a
directory with a ``quantization.json``; this module imports nothing of ``llmstack.models`` at import
time, so the two packages do not import each other in a cycle.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmstack.errors import ModelLoadError
from llmstack.quantize._base import read_recipe

if TYPE_CHECKING:
    from llmstack.registry import ArtifactRef, Registry


def is_quantized_dir(directory: str | Path) -> bool:
    """True when ``directory`` holds a model quantized by llmstack or by a transformers quantizer."""
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


def rebuild_quantized(directory: str | Path, *, where: str | None = None) -> Any:
    """The quantized model saved in ``directory`` by :func:`quantize`, rebuilt by its backend (eval mode).

    Raises:
        ModelLoadError: no recipe, no safetensors weights, or the backend cannot rebuild it.
    """
    from llmstack.quantize._dispatch import get_backend

    directory = Path(directory)
    shown = where or str(directory)
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
    model.eval()
    return model


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
    from llmstack.models.artifact import describe_artifact, load_artifact
    from llmstack.registry import Registry

    registry = registry or Registry()
    artifact = describe_artifact(registry.resolve(ref), registry=registry)
    if artifact.kind != "quantized":
        raise ModelLoadError(f"{artifact.label} is a {artifact.kind}, not a quantized model; load it with "
                             "llmstack.models.load_artifact")
    loaded = load_artifact(artifact)
    return loaded.model, loaded.tokenizer


def load_any(source: str | ArtifactRef, registry: Registry | None = None, *,
             dtype: str = "float32") -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` whether ``source`` is quantized or a plain float model.

    The same as ``llmstack.models.load_artifact(source, registry=registry, dtype=dtype)``: quantized
    versions are rebuilt from their recipe (``dtype`` then comes from the recipe).

    Example:
        >>> model, tokenizer = load_any("tiny-lm@production")  # doctest: +SKIP
    """
    from llmstack.models.artifact import load_artifact

    loaded = load_artifact(source, registry=registry, dtype=dtype)
    return loaded.model, loaded.tokenizer
