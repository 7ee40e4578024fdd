"""What every quantization backend provides, and the shared safetensors format for llmstack's own kernels.

A backend module exposes one ``BACKEND`` object with this shape; the dispatcher in ``_dispatch``
picks the first whose ``methods`` contains the requested method.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

RECIPE_FILE = "quantization.json"  # written into every quantized version; its presence marks one
FORMAT_VERSION = 1


class Backend(Protocol):
    """A quantization backend (one module per backend, heavy imports inside the methods)."""

    methods: tuple[str, ...]
    needs_calibration: tuple[str, ...]  # the methods of this backend that calibrate on data
    format: str  # recorded in the recipe: bitsandbytes | torchao (default llmstack-int8)

    def hardware_problem(self, method: str, config: Any) -> str | None:
        """Why the method's kernel cannot run here (None: it can)."""

    def architecture_problems(self, skeleton: Any, method: str) -> list[str]:
        """What the model lacks for this method (checked on a weightless meta-device copy)."""

    def quantize(self, model: Any, *, method: str, source_dir: Path, config: Any,
                 calibration: Any, progress: Callable[[str], None]) -> tuple[Any, dict[str, Any]]:
        """Return ``(quantized model, recipe details)``; may consume ``model`` (the float source)."""

    def save(self, model: Any, directory: Path) -> None:
        """Write the quantized weights (safetensors only) and config.json to ``directory``."""

    def load(self, directory: Path, recipe: dict[str, Any]) -> Any:
        """Rebuild the quantized model saved by :meth:`save`."""


@dataclass
class Recipe:
    """The ``quantization.json`` of a quantized version: how to rebuild and what was done."""

    method: str
    format: str  # bitsandbytes | llmstack-int8 | torchao
    source: str | None  # registry ref or directory of the float source
    dtype: str  # dtype of the non-quantized parts and of the compute
    config: dict[str, Any] = field(default_factory=dict)  # QuantizeConfig as plain data
    details: dict[str, Any] = field(default_factory=dict)  # backend specifics (alpha chosen, layers, ...)
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "format": self.format, "source": self.source, "dtype": self.dtype,
                "config": self.config, "details": self.details, "format_version": self.format_version}

    def write(self, directory: Path) -> Path:
        path = Path(directory) / RECIPE_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True), encoding="utf-8")
        return path


def read_recipe(directory: Path) -> dict[str, Any] | None:
    """The recipe of a quantized model directory, or None for a plain (float) model directory."""
    path = Path(directory) / RECIPE_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def meta_skeleton(directory: Path) -> Any:
    """The model architecture of ``directory`` built on the meta device (no weights, no memory)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(directory))
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


# ----------------------------------------------------------------- llmstack-int8 safetensors format

LLMSTACK_FORMAT = "llmstack-int8"


def save_int8_model(model: Any, directory: Path, *, method: str) -> None:
    """config.json (with a ``quantization_config`` naming the llmstack method) plus model.safetensors.

    Plain ``transformers.from_pretrained`` does NOT understand this format: transformers 5 only warns
    about the unknown ``quant_method`` and would load the int8 tensors as float weights without their
    scales. Load these directories with :func:`llmstack.models.load_artifact`, which routes on
    ``quantization.json`` to the loader this package registers.
    """
    from safetensors.torch import save_model

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config["quantization_config"] = {"quant_method": f"llmstack-{method}",
                                     "note": "load with llmstack.models.load_artifact"}
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(str(directory))
    save_model(model, str(directory / "model.safetensors"))  # shared (tied) tensors stored once


def load_int8_model(directory: Path, *, dtype: str, convert: Callable[[Any], None]) -> Any:
    """Rebuild a model saved by :func:`save_int8_model`.

    The float architecture is built from config.json, ``convert`` swaps in the empty int8 modules,
    then every tensor is loaded with ``strict=True``: a missing or extra tensor is an error, never a
    silently random layer.
    """
    import torch
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    config = AutoConfig.from_pretrained(str(directory))
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.random.fork_rng(devices=[]):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    convert(model)
    missing, unexpected = load_model(model, str(directory / "model.safetensors"), strict=True)
    del missing, unexpected  # strict=True raised already if either was non-empty
    model.eval()
    return model
