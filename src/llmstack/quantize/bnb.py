"""bitsandbytes backend: ``int8`` (LLM.int8 with fp16 outlier columns) and ``nf4`` / ``fp4`` (4-bit blockwise).

Quantization goes through ``transformers``' ``BitsAndBytesConfig`` while loading the float source,
exactly as on a GPU. On CPU this works with bitsandbytes >= 0.45 (its multi-backend refactor), and
``save_pretrained`` serializes the quantized tensors to safetensors: int8 ``weight`` + ``SCB`` row
scales for LLM.int8, packed 4-bit ``weight`` + ``absmax`` (+ nested absmax with double quant) +
``quant_map`` + the quant state for 4-bit. ``from_pretrained`` reads them back bit-exactly, so a
saved version is the quantized model itself (no re-quantization at load).

CPU kernels in bitsandbytes 0.50 (``bitsandbytes/backends/cpu/ops.py``, ``default/ops.py``):

* LLM.int8: activations are cast to fp16 and row-quantized (``int8_vectorwise_quant``, plain torch
  ops); columns with any ``|x| >= threshold`` are zeroed and computed in fp16 instead; the int8
  part runs ``torch._int_mm`` — registered only on AVX-512 CPUs. Elsewhere bitsandbytes silently
  emulates it in fp32, so we refuse ``int8`` there (``hardware_problem``).
* 4-bit: quantization is plain torch ops; inference dequantizes with the native CPU library, or
  (AVX512-BF16 CPUs) repacks the weight on the first inference forward and then runs a fused bf16
  ``gemv_4bit`` kernel. Saving *after* that repack is lossy in 0.50 (the inverse repack keeps a
  bf16 absmax; perplexity of the reloaded model moved by ~10% in our tests), so ``quantize()``
  saves right after quantizing, before any evaluation. Reloaded weights are then bit-identical.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

_DTYPES = {"float32", "bfloat16", "float16"}


class _DropMessage(logging.Filter):
    """Drops one noisy per-forward warning (bitsandbytes logs it on every LLM.int8 call on CPU)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def _import_bnb() -> Any:
    # bitsandbytes warns at import when the optional `kernels` hub package is absent; it then
    # falls back to its own native CPU kernel, which is what we want offline.
    cpu_logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = cpu_logger.level
    cpu_logger.setLevel(logging.ERROR)
    try:
        import bitsandbytes as bnb
    finally:
        cpu_logger.setLevel(level)
    autograd_logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropMessage) for f in autograd_logger.filters):
        autograd_logger.addFilter(_DropMessage("inputs will be cast from"))
    return bnb


class BitsAndBytesBackend:
    methods = ("int8", "nf4", "fp4")
    format = "bitsandbytes"
    needs_calibration: tuple[str, ...] = ()

    def hardware_problem(self, method: str, config: Any) -> str | None:
        try:
            _import_bnb()
            from bitsandbytes.cextension import ErrorHandlerMockBNBNativeLibrary, lib
        except Exception as exc:  # not installed, or broken native library
            return f"bitsandbytes cannot be imported ({type(exc).__name__}: {exc})"
        import torch

        if getattr(config, "device", "cpu") != "cpu" and not torch.cuda.is_available():
            return f"device {config.device!r} requested but CUDA is not available"
        if isinstance(lib, ErrorHandlerMockBNBNativeLibrary) and method in ("nf4", "fp4"):
            return "the bitsandbytes native CPU library failed to load, so its 4-bit kernels are missing"
        if method == "int8" and getattr(config, "device", "cpu") == "cpu":
            capability = torch.backends.cpu.get_cpu_capability()
            if capability != "AVX512":
                return (f"bitsandbytes runs LLM.int8 on CPU only with AVX-512 (this CPU: {capability}); "
                        "elsewhere it would silently emulate int8 in fp32. Use method=int8-weight-only or w8a8")
        return None

    def architecture_problems(self, skeleton: Any, method: str) -> list[str]:
        from llmstack.quantize._int8 import decoder_linear_names

        if not decoder_linear_names(skeleton):
            return [f"{type(skeleton).__name__} has no nn.Linear layers in a decoder stack (model.layers) "
                    f"for {method} to quantize"]
        return []

    def bnb_config(self, method: str, config: Any) -> Any:
        import torch
        from transformers import BitsAndBytesConfig

        skip = ["lm_head"]
        if method == "int8":
            return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=float(config.bitsandbytes.threshold),
                                      llm_int8_skip_modules=skip)
        compute = getattr(torch, config.dtype or "float32")
        qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=method,
                                bnb_4bit_use_double_quant=bool(config.bitsandbytes.double_quant),
                                bnb_4bit_compute_dtype=compute, llm_int8_skip_modules=skip)
        return qc

    def quantize(self, model: Any, *, method: str, source_dir: Path, config: Any, calibration: Any,
                 progress: Callable[[str], None]) -> tuple[Any, dict[str, Any]]:
        """Reload the float source through ``BitsAndBytesConfig`` (``model`` is not needed)."""
        import torch
        from transformers import AutoModelForCausalLM

        _import_bnb()
        del model  # bitsandbytes quantizes while loading the float checkpoint from disk
        progress(f"bitsandbytes {method}: quantizing while loading the float weights")
        qc = self.bnb_config(method, config)
        device = getattr(config, "device", "cpu")
        quantized = AutoModelForCausalLM.from_pretrained(
            str(source_dir), quantization_config=qc, device_map={"": device},
            dtype=getattr(torch, config.dtype or "float32"), use_safetensors=True)
        if method != "int8":
            _set_blocksize(quantized, config.bitsandbytes.block_size, source_dir)
        quantized.eval()
        details = {"bnb_version": _bnb_version(), "skip_modules": ["lm_head"],
                   "quantization_config": qc.to_dict()}
        return quantized, _jsonable(details)

    def save(self, model: Any, directory: Path) -> None:
        model.save_pretrained(str(directory), safe_serialization=True)

    def load(self, directory: Path, recipe: dict[str, Any]) -> Any:
        import torch
        from transformers import AutoModelForCausalLM

        _import_bnb()
        dtype = recipe.get("dtype", "float32")
        device = recipe.get("config", {}).get("device") or "cpu"
        model = AutoModelForCausalLM.from_pretrained(str(directory), device_map={"": device},
                                                     dtype=getattr(torch, dtype), use_safetensors=True)
        model.eval()
        return model


def _set_blocksize(model: Any, block_size: int, source_dir: Path) -> None:
    """Re-quantize the 4-bit layers with ``block_size`` from the source's float weights.

    ``BitsAndBytesConfig`` has no block-size option (bitsandbytes' default is 64), so for any other
    size each ``Linear4bit`` is quantized again from the original float tensor read from the
    source safetensors (never from its own dequantized weight, which would round twice).
    """
    import bitsandbytes.functional as F
    from safetensors import safe_open

    targets = {name: module for name, module in model.named_modules()
               if getattr(getattr(module, "weight", None), "quant_state", None) is not None}
    targets = {name: m for name, m in targets.items() if m.weight.quant_state.blocksize != block_size}
    if not targets:
        return
    for path in sorted(Path(source_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                module = targets.get(key.removesuffix(".weight")) if key.endswith(".weight") else None
                if module is None:
                    continue
                weight = module.weight
                state = weight.quant_state
                full = handle.get_tensor(key).to(state.dtype)
                data, new_state = F.quantize_4bit(full, blocksize=block_size, quant_type=state.quant_type,
                                                  compress_statistics=state.nested,
                                                  quant_storage=weight.data.dtype)
                weight.data, weight.quant_state, weight.blocksize = data, new_state, block_size


def _bnb_version() -> str:
    import bitsandbytes

    return str(bitsandbytes.__version__)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


BACKEND = BitsAndBytesBackend()
