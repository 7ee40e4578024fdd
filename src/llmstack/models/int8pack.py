"""int8 weight-only linear layers on aten's CPU int8 kernel (``_weight_int8pack_mm``), shared by the quantized
layers ``quantize`` loads (:mod:`llmstack.quantize.torchao_backend`) and the serving engine's fused projections.

The kernel takes bf16 scales; rounding each channel's scale to bf16 would bias whole channels by up to 0.4%, so
it runs with unit scales and the fp32 per-channel scales are applied to its output.
"""

from __future__ import annotations

from typing import Any

UNIT_SCALE_ATTR = "_llmstack_unit_scale"  # the bf16 ones buffer of a layer routed through the kernel


def int8pack_linear(x: Any, qdata: Any, unit_scale: Any, scale: Any, bias: Any = None) -> Any:
    """``x W^T + b`` for int8 rows ``qdata`` ``[out, in]`` with fp32 per-row ``scale``, in ``x``'s dtype."""
    import torch

    rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()
    y = torch.ops.aten._weight_int8pack_mm(rows, qdata, unit_scale).float().mul_(scale.reshape(1, -1))
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])


def uses_int8pack(module: Any) -> bool:
    """Whether ``module`` is a linear layer whose int8 weight runs on :func:`int8pack_linear`."""
    return getattr(module, UNIT_SCALE_ATTR, None) is not None and getattr(module.weight, "qdata", None) is not None
