"""SmoothQuant W8A8 (Xiao et al., 2023) and naive W8A8, both with real int8 matmuls.

Both methods quantize every decoder linear to per-output-channel int8 weights and quantize the
activations per token, dynamically, to int8; the product runs as ``torch._int_mm`` (int32
accumulation) followed by one float rescale (:class:`~llmstack.quantize._int8.W8A8Linear`).

SmoothQuant first migrates activation outliers into the weights with a per-input-channel scale

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)          X' = X / s,  W' = W * s

which leaves the float network's function unchanged. The ``1/s`` has to be absorbed by whatever
produces ``X``; in a LLaMA decoder layer that is possible at four places:

* ``input_layernorm -> q/k/v_proj``: RMSNorm weight ``/ s``, q/k/v weight columns ``* s``
  (one ``s`` shared by the three projections, from the max over their weight columns);
* ``post_attention_layernorm -> gate/up_proj``: the same with the MLP norm;
* ``v_proj -> o_proj`` (``smooth_outputs``): attention mixes value vectors linearly, so scaling
  ``v_proj``'s output rows by ``1/s`` scales ``o_proj``'s inputs by ``1/s``. With grouped-query
  attention each KV channel feeds ``num_heads / num_kv_heads`` query heads, so ``s`` is shared
  across the group (max over the group's activations and weight columns);
* ``up_proj -> down_proj`` (``smooth_outputs``): ``down`` sees ``silu(gate) * up``, linear in
  ``up``, so ``up``'s output rows take ``1/s`` and ``down``'s columns ``* s``.

The paper smooths only the first two (its OPT/BLOOM ``o``/``fc2`` inputs have no norm in front);
the last two are exact here too and are on by default; ``smooth_outputs=False`` restores the paper's
scope, leaving ``o_proj`` / ``down_proj`` W8A8 unsmoothed. ``alpha`` may be searched on the
calibration set (``search_alpha``): each candidate is smoothed, quantized and scored by
calibration loss. ``kernel="fake-quant"`` runs the identical rounding with float matmuls.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmstack.quantize._base import LLMSTACK_FORMAT, load_int8_model, save_int8_model
from llmstack.quantize._evaluate import mean_nll

DEFAULT_ALPHA_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


# ------------------------------------------------------------------------------ architecture


def layout_problems(model: Any, *, need_norms: bool) -> list[str]:
    """What a LLaMA-style decoder needs for (Smooth)W8A8, reported against the given model."""
    from torch import nn

    layers = getattr(getattr(model, "model", None), "layers", None)
    kind = type(model).__name__
    if layers is None or len(layers) == 0:
        return [f"{kind} has no decoder stack at model.layers (LLaMA-style layout needed)"]
    problems: list[str] = []
    layer = layers[0]
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    for owner, names, where in ((attn, _ATTN, "self_attn"), (mlp, _MLP, "mlp")):
        for name in names:
            if not isinstance(getattr(owner, name, None), nn.Linear):
                problems.append(f"{kind} layer 0 has no nn.Linear {where}.{name}")
    if need_norms:
        for norm in ("input_layernorm", "post_attention_layernorm"):
            module = getattr(layer, norm, None)
            if module is None or not _is_rms_norm(module):
                problems.append(f"{kind} layer 0 has no RMSNorm {norm} in front of the projections "
                                f"(found {type(module).__name__ if module is not None else 'nothing'}); "
                                "SmoothQuant folds its scales into that norm's weight")
    return problems


def _is_rms_norm(module: Any) -> bool:
    weight = getattr(module, "weight", None)
    return ("rmsnorm" in type(module).__name__.lower() and weight is not None
            and getattr(module, "bias", None) is None)


# ------------------------------------------------------------------------------ calibration


def collect_activation_maxima(model: Any, blocks: Any, *, batch_size: int = 8) -> dict[str, Any]:
    """Per-input-channel ``max |X_j|`` of every decoder linear over the calibration ``blocks`` [n, T]."""
    import torch

    from llmstack.quantize._int8 import decoder_linear_names

    maxima: dict[str, torch.Tensor] = {}
    hooks = []

    def hook(name: str) -> Callable[..., None]:
        def record(_module: Any, inputs: tuple[Any, ...], _output: Any) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).abs().amax(dim=0).float()
            maxima[name] = torch.maximum(maxima[name], x) if name in maxima else x
        return record

    for name in decoder_linear_names(model):
        hooks.append(model.get_submodule(name).register_forward_hook(hook(name)))
    try:
        with torch.inference_mode():
            for start in range(0, blocks.shape[0], batch_size):
                model(input_ids=blocks[start:start + batch_size], use_cache=False)
    finally:
        for handle in hooks:
            handle.remove()
    return maxima


# ------------------------------------------------------------------------------ smoothing


def _scales(act_max: Any, weight_max: Any, alpha: float) -> Any:
    """``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)``, guarded against zero channels."""
    s = act_max.clamp(min=1e-5).pow(alpha) / weight_max.clamp(min=1e-5).pow(1.0 - alpha)
    return s.clamp(min=1e-5)


def smooth_model(model: Any, act_max: dict[str, Any], *, alpha: float, smooth_outputs: bool = True) -> dict[str, Any]:
    """Fold SmoothQuant scales into ``model`` in place; the float function stays the same.

    Returns a small summary (max activation range before/after per site) for the recipe.
    """
    import torch

    config = model.config
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    n_rep = n_heads // n_kv
    flatness = []
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            p = f"model.layers.{i}."
            attn, mlp = layer.self_attn, layer.mlp
            # norm -> q/k/v and norm -> gate/up
            for norm, linears, key in ((layer.input_layernorm, (attn.q_proj, attn.k_proj, attn.v_proj),
                                        p + "self_attn.q_proj"),
                                       (layer.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj),
                                        p + "mlp.gate_proj")):
                a = act_max[key]
                w = torch.stack([lin.weight.abs().amax(dim=0).float() for lin in linears]).amax(dim=0)
                s = _scales(a, w, alpha)
                norm.weight.div_(s.to(norm.weight.dtype))
                for lin in linears:
                    lin.weight.mul_(s.to(lin.weight.dtype))
                flatness.append(float(a.max() / a.mean().clamp(min=1e-8)))
            if not smooth_outputs:
                continue
            # v_proj -> o_proj, one scale per KV channel shared by its query-head group
            a = act_max[p + "self_attn.o_proj"].view(n_kv, n_rep, head_dim).amax(dim=1)  # [n_kv, d]
            w = attn.o_proj.weight.abs().amax(dim=0).float().view(n_kv, n_rep, head_dim).amax(dim=1)
            s = _scales(a, w, alpha).reshape(-1)  # [n_kv * d] = v_proj out channels
            attn.v_proj.weight.div_(s[:, None].to(attn.v_proj.weight.dtype))
            if attn.v_proj.bias is not None:
                attn.v_proj.bias.div_(s.to(attn.v_proj.bias.dtype))
            s_o = s.view(n_kv, 1, head_dim).expand(n_kv, n_rep, head_dim).reshape(-1)
            attn.o_proj.weight.mul_(s_o.to(attn.o_proj.weight.dtype))
            # up_proj -> down_proj
            a = act_max[p + "mlp.down_proj"]
            w = mlp.down_proj.weight.abs().amax(dim=0).float()
            s = _scales(a, w, alpha)
            mlp.up_proj.weight.div_(s[:, None].to(mlp.up_proj.weight.dtype))
            if mlp.up_proj.bias is not None:
                mlp.up_proj.bias.div_(s.to(mlp.up_proj.bias.dtype))
            mlp.down_proj.weight.mul_(s.to(mlp.down_proj.weight.dtype))
    return {"max_over_mean_activation_before": round(max(flatness), 3) if flatness else None}


def quantize_linears(model: Any, *, kernel: str = "int8") -> list[str]:
    """Replace every decoder ``nn.Linear`` by a :class:`W8A8Linear`; returns the replaced names."""
    from llmstack.quantize._int8 import W8A8Linear, decoder_linear_names, replace_module

    names = decoder_linear_names(model)
    for name in names:
        replace_module(model, name, W8A8Linear.from_linear(model.get_submodule(name), mode=kernel))
    return names


def calibration_loss(model: Any, blocks: Any, *, batch_size: int = 8) -> float:
    """Mean next-token cross-entropy (nats) on ``blocks``."""
    return mean_nll(model, blocks, batch_size=batch_size)


# ------------------------------------------------------------------------------ backend


class SmoothQuantBackend:
    methods = ("smoothquant", "w8a8")
    needs_calibration: tuple[str, ...] = ("smoothquant",)

    def hardware_problem(self, method: str, config: Any) -> str | None:
        from llmstack.quantize._int8 import int_mm_problem

        if getattr(config, "kernel", "int8") == "fake-quant":
            return None
        problem = int_mm_problem(getattr(config, "device", "cpu"))
        return f"{problem}; kernel=fake-quant simulates W8A8 in float instead" if problem else None

    def architecture_problems(self, skeleton: Any, method: str) -> list[str]:
        return layout_problems(skeleton, need_norms=method == "smoothquant")

    def quantize(self, model: Any, *, method: str, source_dir: Path, config: Any, calibration: Any,
                 progress: Callable[[str], None]) -> tuple[Any, dict[str, Any]]:
        kernel = getattr(config, "kernel", "int8")
        details: dict[str, Any] = {"kernel": kernel, "weights": "int8 per output channel, symmetric",
                                   "activations": "int8 per token, dynamic, symmetric",
                                   "matmul": "torch._int_mm" if kernel == "int8" else "float (fake-quant)"}
        if method == "w8a8":
            details["layers"] = quantize_linears(model, kernel=kernel)
            return model, details
        smooth_outputs = bool(getattr(config, "smooth_outputs", True))
        progress(f"smoothquant: calibrating activation maxima on {calibration.shape[0]} blocks")
        act_max = collect_activation_maxima(model, calibration)
        alpha = float(config.alpha)
        if config.search_alpha:
            grid = tuple(config.alpha_grid or DEFAULT_ALPHA_GRID)
            scores: dict[str, float] = {}
            for candidate in grid:
                trial = copy.deepcopy(model)
                smooth_model(trial, act_max, alpha=candidate, smooth_outputs=smooth_outputs)
                quantize_linears(trial, kernel=kernel)
                scores[f"{candidate:g}"] = round(calibration_loss(trial, calibration), 5)
                progress(f"smoothquant: alpha={candidate:g} calibration loss {scores[f'{candidate:g}']:.4f}")
                del trial
            alpha = float(min(scores, key=lambda k: scores[k]))
            details["alpha_search"] = {"grid": list(grid), "calibration_loss": scores,
                                       "calibration_ppl": {k: round(math.exp(v), 4) for k, v in scores.items()}}
        summary = smooth_model(model, act_max, alpha=alpha, smooth_outputs=smooth_outputs)
        details.update(alpha=alpha, smooth_outputs=smooth_outputs, **summary,
                       smoothed=["input_layernorm->q/k/v", "post_attention_layernorm->gate/up"]
                       + (["v_proj->o_proj", "up_proj->down_proj"] if smooth_outputs else []))
        details["layers"] = quantize_linears(model, kernel=kernel)
        return model, details

    def save(self, model: Any, directory: Path) -> None:
        save_int8_model(model, directory, method="w8a8")

    def load(self, directory: Path, recipe: dict[str, Any]) -> Any:
        from llmstack.quantize._int8 import W8A8Linear, replace_module

        layers = recipe.get("details", {}).get("layers", [])
        kernel = recipe.get("details", {}).get("kernel", "int8")

        def convert(model: Any) -> None:
            for name in layers:
                old = model.get_submodule(name)
                replace_module(model, name, W8A8Linear(old.in_features, old.out_features,
                                                       bias=old.bias is not None, mode=kernel))

        return load_int8_model(directory, dtype=recipe.get("dtype", "float32"), convert=convert)


FORMAT = LLMSTACK_FORMAT
BACKEND = SmoothQuantBackend()
