"""Int8 building blocks: symmetric quantizers, the int8 matmul and the W8A8 linear.

``W8A8Linear`` is the SmoothQuant execution path: per-output-channel int8 weights, per-token
dynamic int8 activations and a real ``int8 x int8 -> int32`` matmul (``torch._int_mm``), then
one float rescale. Its ``fake-quant`` mode runs the same rounding in float (for accuracy studies
only; it is never faster). It keeps plain int8/float tensors in its ``state_dict`` so it
round-trips through safetensors. (The torchao methods live in :mod:`~llmstack.quantize.torchao_backend`.)
"""

from __future__ import annotations

import functools

import torch
from torch import nn

QMAX = 127.0  # symmetric int8 range [-127, 127]; -128 is never produced


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8: ``weight [out, in] ~= q [out, in] * scale [out, 1]``."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-8) / QMAX  # [out]
    q = torch.round(w / scale[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (token) dynamic symmetric int8: ``x [m, k] ~= q [m, k] * scale [m, 1]``."""
    x = x.float()
    scale = x.abs().amax(dim=-1, keepdim=True).clamp_(min=1e-8).div_(QMAX)  # [m, 1]
    q = torch.round(x / scale).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def int8_matmul(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """``a [m, k] int8 @ b_t [k, n] int8 -> [m, n] int32`` with ``torch._int_mm``.

    On CPU (torch >= 2.6) any shape works (checked by the unit tests). CUDA needs m > 16 and
    k, n multiples of 8, so there we zero-pad: zero rows/columns add nothing to the sums.
    """
    if a.device.type != "cuda":
        return torch._int_mm(a, b_t)
    m, k = a.shape
    n = b_t.shape[1]
    pm, pk, pn = max(17, m) - m, (-k) % 8, (-n) % 8
    if pm or pk:
        a = torch.nn.functional.pad(a, (0, pk, 0, pm))
    if pk or pn:
        b_t = torch.nn.functional.pad(b_t, (0, pn, 0, pk))
    return torch._int_mm(a, b_t)[:m, :n]


@functools.lru_cache(maxsize=8)
def int_mm_problem(device: str = "cpu") -> str | None:
    """Why ``torch._int_mm`` cannot run on ``device`` (None when it runs and is exact)."""
    try:
        dev = torch.device(device)
        a = torch.randint(-127, 128, (3, 24), dtype=torch.int8, device=dev)
        b = torch.randint(-127, 128, (24, 16), dtype=torch.int8, device=dev)
        got = int8_matmul(a, b).cpu()
    except Exception as exc:  # missing kernel, no such device, old GPU
        return f"torch._int_mm (int8 x int8 -> int32) is unavailable on {device}: {type(exc).__name__}: {exc}"
    want = a.cpu().long() @ b.cpu().long()
    if not torch.equal(got.long(), want):
        return f"torch._int_mm on {device} returned wrong int32 sums (overflowing kernel on this CPU)"
    return None


class W8A8Linear(nn.Module):
    """Linear layer with int8 weights and per-token dynamic int8 activations.

    Args:
        in_features: input width.
        out_features: output width.
        bias: keep a float bias.
        mode: ``"int8"`` (real ``torch._int_mm``) or ``"fake-quant"`` (same rounding, float matmul).
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool = False, mode: str = "int8") -> None:
        super().__init__()
        if mode not in ("int8", "fake-quant"):
            raise ValueError(f"W8A8Linear mode must be 'int8' or 'fake-quant', got {mode!r}")
        self.in_features, self.out_features, self.mode = in_features, out_features, mode
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, mode: str = "int8") -> W8A8Linear:
        module = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, mode=mode)
        q, scale = quantize_per_channel(linear.weight)
        module.weight.copy_(q)
        module.weight_scale.copy_(scale)
        if linear.bias is not None:
            module.bias = linear.bias.detach().clone()
        return module.to(linear.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # [m, k]
        xq, xs = quantize_per_token(x2)  # int8 [m, k], float [m, 1]
        if self.mode == "int8":
            acc = int8_matmul(xq, self.weight.t()).float()  # int32 [m, n] -> float
        else:  # fake-quant: dequantized operands, float matmul (accuracy studies only)
            acc = xq.float() @ self.weight.float().t()
        y = acc.mul_(xs).mul_(self.weight_scale)  # [m, n] * [m, 1] * [n]
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}"


def decoder_linear_names(model: nn.Module) -> list[str]:
    """Names of the ``nn.Linear`` layers inside the decoder stack (``lm_head`` and embeddings stay float)."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and ".layers." in f".{name}" and "lm_head" not in name:
            names.append(name)
    return names


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
