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

The norm in front of the MLP is ``pre_feedforward_layernorm`` where a layer has one (Gemma-2/3, whose
``post_attention_layernorm`` normalises the attention output instead), else ``post_attention_layernorm``.
A scale folds only into a norm whose output is, channel by channel, ``(c + weight) * f(x) (+ bias)``,
checked by probing the module itself: ``c = 0`` for LLaMA's RMSNorm and ``LayerNorm`` (whose bias is
divided too), ``c = 1`` for Gemma's RMSNorm (the effective scale is ``1 + weight``, so the new weight is
``(1 + weight) / s - 1``). Any other norm, or one whose output is not the projections' input (checked on
one forward pass), is refused naming its class and path.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmstack.errors import ConfigError
from llmstack.quantize._base import LLMSTACK_FORMAT, load_int8_model, save_int8_model
from llmstack.quantize._evaluate import mean_nll

DEFAULT_ALPHA_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


# ------------------------------------------------------------------------------ architecture


_MLP_NORMS = ("pre_feedforward_layernorm", "post_attention_layernorm")  # the first a layer has feeds its MLP
_FOLDABLE = "RMSNorm (weight * x or Gemma's (1 + weight) * x) or LayerNorm (weight * x + bias)"


def layout_problems(model: Any, *, need_norms: bool) -> list[str]:
    """What a LLaMA-style decoder needs for (Smooth)W8A8, reported against the given model (a meta skeleton works)."""
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
        for norm in ("input_layernorm", _mlp_norm_name(layer)):
            module = getattr(layer, norm, None)
            if module is None:
                problems.append(f"{kind} layer 0 has no {norm} in front of the projections; SmoothQuant folds its "
                                f"scales into that norm ({_FOLDABLE})")
                continue
            try:
                norm_fold(module, f"model.layers.0.{norm}")
            except ConfigError as exc:
                problems.append(f"{kind} layer 0 has no RMSNorm {norm} (or other norm) to fold into: {exc.problems[0]}")
    return problems


def _mlp_norm_name(layer: Any) -> str:
    return next((name for name in _MLP_NORMS if getattr(layer, name, None) is not None), _MLP_NORMS[-1])


@dataclass(frozen=True)
class NormFold:
    """How a norm's output scales per channel: ``(offset + weight) * f(x) (+ bias)``."""

    offset: float  # 0: LLaMA's RMSNorm and LayerNorm; 1: Gemma's RMSNorm, whose weight is stored minus one
    bias: bool  # LayerNorm: the bias is divided by the scale too

    def apply(self, norm: Any, s: Any) -> None:
        """Divide ``norm``'s output by ``s`` (per channel), in place."""
        weight = norm.weight
        weight.copy_(((self.offset + weight.float()) / s - self.offset).to(weight.dtype))
        if self.bias:
            norm.bias.copy_((norm.bias.float() / s).to(norm.bias.dtype))


def norm_fold(module: Any, path: str) -> NormFold:
    """How to fold a scale into ``module`` (at ``path``), found by probing its output against its weight.

    Raises:
        ConfigError: the norm's output is not ``(c + weight) * f(x) (+ bias)`` with ``c`` 0 or 1; names the
            module's class and path.
    """
    import torch

    def refuse(why: str) -> ConfigError:
        return ConfigError(f"SmoothQuant cannot fold its scales into {path} ({type(module).__name__}): {why}; "
                           f"it folds into {_FOLDABLE}")

    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    if not isinstance(weight, torch.nn.Parameter) or weight.dim() != 1:
        raise refuse("it has no per-channel weight")
    if bias is not None and (not isinstance(bias, torch.nn.Parameter) or bias.shape != weight.shape):
        raise refuse("its bias is not per channel")
    probe = copy.deepcopy(module)
    if any(t.is_meta for t in (*probe.parameters(), *probe.buffers())):
        probe = probe.to_empty(device="cpu")
    probe = probe.float()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, weight.numel(), generator=generator) * 2 + 0.5
    r = torch.rand(weight.numel(), generator=generator) + 0.5

    def output(w: Any, b: Any = 0.0) -> Any:
        with torch.no_grad():
            probe.weight.copy_(torch.as_tensor(w).expand_as(probe.weight))
            if getattr(probe, "bias", None) is not None:
                probe.bias.copy_(torch.as_tensor(b).expand_as(probe.bias))
            return probe(x).float()

    try:
        at_zero, at_one, at_r = output(0.0), output(1.0), output(r)
        with_bias = output(1.0, r) if bias is not None else None
    except Exception as exc:  # noqa: BLE001 - any failure to run it alone means we cannot reason about it
        raise refuse(f"probing it alone failed ({type(exc).__name__}: {exc})") from None
    coefficient = at_one - at_zero  # f(x)
    close = lambda a, b: torch.allclose(a, b, rtol=1e-4, atol=1e-5)  # noqa: E731
    for offset in (0.0, 1.0):
        if (coefficient.abs().amax() > 0 and close(at_zero, offset * coefficient)
                and close(at_r, (offset + r) * coefficient)
                and (with_bias is None or close(with_bias, (offset + 1.0) * coefficient + r))):
            return NormFold(offset=offset, bias=bias is not None)
    raise refuse("its output is not (weight or 1 + weight) times a function of the input, plus an optional bias")


def _submodule(model: Any, path: str) -> Any:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _check_norms_feed(model: Any, sites: list[tuple[str, str]]) -> None:
    """Refuse unless each ``(norm path, linear path)`` pair's linear takes exactly the norm's output as input.

    One forward pass over a few tokens, with hooks: a norm that only looks as if it sat in front (e.g. one that
    normalises the attention output) would make folding change the model.
    """
    import torch

    seen: dict[str, Any] = {}

    def record(key: str, *, output: bool) -> Callable[..., None]:
        def hook(_module: Any, inputs: tuple[Any, ...], out: Any) -> None:
            seen.setdefault(key, (out if output else inputs[0]).detach())
        return hook

    hooks = []
    for norm, linear in sites:
        hooks.append(model.get_submodule(norm).register_forward_hook(record(norm, output=True)))
        hooks.append(model.get_submodule(linear).register_forward_hook(record(linear, output=False)))
    device = next(model.parameters()).device
    try:
        with torch.inference_mode():
            model(input_ids=(torch.arange(8, device=device) % model.config.vocab_size)[None], use_cache=False)
    finally:
        for handle in hooks:
            handle.remove()
    for norm, linear in sites:
        if norm not in seen or linear not in seen or seen[norm].shape != seen[linear].shape \
                or not torch.equal(seen[norm], seen[linear]):
            module = model.get_submodule(norm)
            raise ConfigError(f"SmoothQuant cannot fold its scales into {norm} ({type(module).__name__}): its "
                              f"output is not the input of {linear}, so a scale folded there would change the model")


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
    layers = model.model.layers
    sites = [(f"model.layers.{i}.{norm}", f"model.layers.{i}.{linear}") for i, layer in enumerate(layers)
             for norm, linear in (("input_layernorm", "self_attn.q_proj"), (_mlp_norm_name(layer), "mlp.gate_proj"))]
    missing = [norm for norm, _ in sites if _submodule(model, norm) is None]
    if missing:
        raise ConfigError([f"SmoothQuant folds its scales into the norm in front of the projections; {norm} does "
                           "not exist" for norm in missing])
    folds = {norm: norm_fold(model.get_submodule(norm), norm) for norm, _ in sites}  # refuses before any change
    _check_norms_feed(model, sites)
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    n_rep = n_heads // n_kv
    flatness = []
    with torch.no_grad():
        for i, layer in enumerate(layers):
            p = f"model.layers.{i}."
            attn, mlp = layer.self_attn, layer.mlp
            # norm -> q/k/v and norm -> gate/up
            for norm, linears, key in ((p + "input_layernorm", (attn.q_proj, attn.k_proj, attn.v_proj),
                                        p + "self_attn.q_proj"),
                                       (p + _mlp_norm_name(layer), (mlp.gate_proj, mlp.up_proj), p + "mlp.gate_proj")):
                a = act_max[key]
                w = torch.stack([lin.weight.abs().amax(dim=0).float() for lin in linears]).amax(dim=0)
                s = _scales(a, w, alpha)
                folds[norm].apply(model.get_submodule(norm), s)
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

        if config.smoothquant.kernel == "fake-quant":
            return None
        problem = int_mm_problem(getattr(config, "device", "cpu"))
        return f"{problem}; kernel=fake-quant simulates W8A8 in float instead" if problem else None

    def architecture_problems(self, skeleton: Any, method: str) -> list[str]:
        return layout_problems(skeleton, need_norms=method == "smoothquant")

    def quantize(self, model: Any, *, method: str, source_dir: Path, config: Any, calibration: Any,
                 progress: Callable[[str], None]) -> tuple[Any, dict[str, Any]]:
        kernel = config.smoothquant.kernel
        details: dict[str, Any] = {"kernel": kernel, "weights": "int8 per output channel, symmetric",
                                   "activations": "int8 per token, dynamic, symmetric",
                                   "matmul": "torch._int_mm" if kernel == "int8" else "float (fake-quant)"}
        if method == "w8a8":
            details["layers"] = quantize_linears(model, kernel=kernel)
            return model, details
        smooth_outputs = config.smoothquant.smooth_outputs
        progress(f"smoothquant: calibrating activation maxima on {calibration.shape[0]} blocks")
        act_max = collect_activation_maxima(model, calibration)
        alpha = float(config.smoothquant.alpha)
        if config.smoothquant.search_alpha:
            grid = tuple(config.smoothquant.alpha_grid or DEFAULT_ALPHA_GRID)
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
                       smoothed=["input_layernorm->q/k/v", f"{_mlp_norm_name(model.model.layers[0])}->gate/up"]
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
