"""Rebuilding quantized versions: the loader this package registers with :mod:`llmstack.models`.

``llmstack.models.load_artifact`` (the one loader) decides what a source is; for a quantized version it
asks the registered loaders, and :func:`load_recipe_model` (registered by ``llmstack.quantize`` on import)
rebuilds a directory with a ``quantization.json``. llmstack.models never imports this package, so the
two do not import each other in a cycle.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmstack.errors import ModelLoadError
from llmstack.quantize._base import read_recipe



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


def load_recipe_model(directory: Path, where: str) -> Any | None:
    """The quantized loader registered with :func:`llmstack.models.register_quantized_loader`: the model rebuilt
    from ``directory``'s ``quantization.json`` (None when it has none: another loader's format)."""
    if read_recipe(Path(directory)) is None:
        return None
    return rebuild_quantized(directory, where=where)
