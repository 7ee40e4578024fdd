"""The NF4 base of QLoRA: bitsandbytes 4-bit NormalFloat weights, loaded from a float model directory.

Fine-tuning trains QLoRA adapters on it, and loading one builds the same base again, so both go
through :func:`load_nf4_model`. Everything heavy is imported inside the functions.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from llmstack.errors import ModelLoadError, ResourceError

# NF4 settings of the QLoRA base (the QLoRA paper's: 4-bit NormalFloat, double-quantized constants).
NF4_SETTINGS: dict[str, Any] = {"quant_type": "nf4", "double_quant": True, "compute_dtype": "float32"}


def check_bitsandbytes(device: str = "cpu") -> None:
    """Fail fast, saying why, when bitsandbytes cannot run NF4 on ``device``.

    Imports bitsandbytes and round-trips a small tensor through 4-bit NF4 quantization there.

    Raises:
        ResourceError: bitsandbytes is missing, or its 4-bit kernels do not run on ``device``.
    """
    try:
        import bitsandbytes.functional as bnbf
        import torch
    except Exception as exc:  # ImportError, or a broken native library
        raise ResourceError(
            f"method qlora needs bitsandbytes for the NF4 base, but it cannot be imported "
            f"({type(exc).__name__}: {exc}); install bitsandbytes>=0.45 or use lora.method=lora") from None
    try:
        probe = torch.linspace(-1, 1, 128, dtype=torch.float32, device=device).reshape(2, 64)
        packed, state = bnbf.quantize_4bit(probe, blocksize=64, quant_type="nf4", compress_statistics=True)
        restored = bnbf.dequantize_4bit(packed, state)
        if not torch.isfinite(restored).all() or (restored - probe).abs().max() > 0.2:
            raise RuntimeError("NF4 round trip gave wrong values")
    except Exception as exc:
        raise ResourceError(
            f"method qlora: bitsandbytes cannot run 4-bit NF4 quantization on {device} "
            f"({type(exc).__name__}: {exc}); use lora.method=lora, or a device bitsandbytes supports") from None


def nf4_quantization_config() -> Any:
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.float32)


def dequantize_4bit_linears(model: Any) -> int:
    """Replace every bitsandbytes ``Linear4bit`` by an fp32 ``nn.Linear`` holding its dequantized weight.

    The result computes exactly what the NF4 model computes in training (dequantize, then an fp32
    matmul), so a QLoRA adapter merged into it keeps the behaviour it was trained with. (On CPUs
    with AVX512-bf16, bitsandbytes' *inference* path repacks the weights for a bf16 kernel; that
    repacking is undone first.) Returns the count replaced.
    """
    import bitsandbytes.functional as bnbf
    import torch

    replaced = 0
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if type(child).__name__ != "Linear4bit":
                continue
            data, state = child.weight.data, child.weight.quant_state
            if getattr(state, "packing_format_for_cpu", False):  # bnb's CPU inference repacking: undo it
                data, state = bnbf._convert_weight_packed_for_cpu_inverse(data, state)
            weight = bnbf.dequantize_4bit(data, state).float()
            linear = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                     device=weight.device, dtype=torch.float32)
            with torch.no_grad():
                linear.weight.copy_(weight)
                if child.bias is not None:
                    linear.bias.copy_(child.bias.float())
            setattr(parent, child_name, linear)
            replaced += 1
    if hasattr(model, "config"):
        for attr in ("quantization_config", "_pre_quantization_dtype"):
            if hasattr(model.config, attr):
                with contextlib.suppress(AttributeError):
                    delattr(model.config, attr)
    for attr in ("is_quantized", "is_loaded_in_4bit"):
        if getattr(model, attr, False):
            with contextlib.suppress(AttributeError):
                setattr(model, attr, False)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    return replaced


def load_nf4_model(directory: str | Path, *, device: str = "cpu", where: str | None = None) -> Any:
    """The causal LM in ``directory`` (float safetensors) with its linear layers quantized to NF4 as it loads.

    Raises:
        ResourceError: bitsandbytes cannot run NF4 on ``device``.
        ModelLoadError: the directory does not load as an NF4 model.
    """
    import torch
    from transformers import AutoModelForCausalLM

    check_bitsandbytes(device)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(directory), quantization_config=nf4_quantization_config(), dtype=torch.float32,
            device_map={"": device}, use_safetensors=True)
    except Exception as exc:
        raise ModelLoadError(f"cannot load {where or directory} as an NF4 base: {exc}") from None
    keep_nf4_layout(model)
    release_file_mapping(model)
    model.eval()
    return model


def release_file_mapping(model: Any) -> None:
    """Copy the tensors that still view the loaded safetensors mmap into the process's own memory.

    The unquantized tensors (embeddings, norms, head) are slices of one mapping of the whole file, so
    they keep every page read while quantizing -- the fp32 weights the NF4 base replaced -- resident
    in this process. Once they own their memory the mapping and those pages are let go.
    """
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if type(param).__name__ != "Params4bit":
                param.data = param.data.clone()
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None:
                module._buffers[name] = buffer.clone()


def keep_nf4_layout(model: Any) -> None:
    """Keep bitsandbytes on its dequantize-then-fp32-matmul path in every mode.

    On CPUs with AVX512-bf16, ``Linear4bit`` repacks its weights on the first eval-mode forward for
    a bf16 inference kernel (``gemv_4bit``) that has no autograd: training steps after a periodic
    evaluation would then backpropagate through it incorrectly, and eval losses would be computed
    in bf16 rather than the fp32 math the adapter is trained (and merged) with.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
