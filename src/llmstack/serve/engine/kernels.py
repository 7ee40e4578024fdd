"""Linear layers with their weights prepacked for the CPU's matmul library (oneDNN), once at load time.

``nn.Linear`` hands its row-major weight to MKL on every call, and MKL reorders (copies) it per call or
falls back to slow paths on some CPUs: on a 2-core AMD EPYC the 49k x 576 output head of SmolLM2 took
9.9 ms per call at batch 1 and 40 ms at batch 16, against 3.9 ms and 6.1 ms from the same weights packed
once into oneDNN's blocked layout (fp32; bf16 4.6 -> 1.1 ms). :func:`prepack_linears` swaps a served
model's plain ``nn.Linear`` modules for :class:`PackedLinear`, which keeps only the packed weight.

Only plain float layers are packed: adapters (peft wraps ``nn.Linear``), quantized layers and ``nn.Linear``
modules holding quantized weight tensors (torchao) keep theirs.
"""

from __future__ import annotations

import logging
from typing import Any

import torch  # this module is imported lazily, by the engine that packs

logger = logging.getLogger(__name__)

PACKABLE_DTYPES = ("float32", "bfloat16")
PLAIN_WEIGHTS = (torch.nn.Parameter, torch.Tensor)  # not a tensor subclass (torchao's quantized weights)


class PackedLinear(torch.nn.Module):
    """``y = x W^T + b`` with ``W`` held in oneDNN's blocked layout (inference only: no gradients)."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self.weight_dtype = weight.dtype
        self.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(weight, None),
                             persistent=False)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.weight_dtype}, packed"


def packing_supported(dtype: Any) -> str | None:
    """None when oneDNN packs and multiplies ``dtype`` weights exactly here, else why not (one line)."""
    if str(dtype).removeprefix("torch.") not in PACKABLE_DTYPES:
        return f"weights in {dtype} (packing covers {', '.join(PACKABLE_DTYPES)})"
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN"
    try:
        generator = torch.Generator().manual_seed(0)
        linear = torch.nn.Linear(64, 48, dtype=dtype)
        x = torch.randn(3, 64, generator=generator).to(dtype)
        with torch.no_grad():
            expected = linear(x).float()
            got = PackedLinear(linear)(x).float()
    except Exception as exc:  # noqa: BLE001 - any failure means: serve the plain layers
        return f"oneDNN refused {dtype} weights ({type(exc).__name__}: {exc})"
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    if not torch.allclose(got, expected, atol=tolerance, rtol=tolerance):
        return f"oneDNN's {dtype} product differs from torch's on this CPU"
    return None


def prepack_linears(model: Any) -> int:
    """Replace every plain ``nn.Linear`` of ``model`` (CPU, fp32 or bf16 weights that are plain tensors) by a :class:`PackedLinear`; returns
    how many were packed (0, with one log line saying why, where the model or machine does not allow it).

    A tied output head gets a packed copy of its own (the embedding keeps the table it looks rows up in).
    """
    linears = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if type(child) is torch.nn.Linear and type(child.weight) in PLAIN_WEIGHTS]
    if not linears:
        return 0
    devices = {child.weight.device.type for _, _, child in linears}
    dtypes = {child.weight.dtype for _, _, child in linears}
    reason = None
    if devices != {"cpu"}:
        reason = f"weights on {sorted(devices)}"
    elif len(dtypes) != 1:
        reason = f"mixed weight dtypes {sorted(map(str, dtypes))}"
    else:
        reason = packing_supported(next(iter(dtypes)))
    if reason is not None:
        logger.info("linear weights left unpacked: %s", reason)
        return 0
    with torch.no_grad():
        for parent, name, child in linears:
            setattr(parent, name, PackedLinear(child))
    return len(linears)


__all__ = ["PackedLinear", "packing_supported", "prepack_linears"]
