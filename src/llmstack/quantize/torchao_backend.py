"""torchao backend: ``int8-weight-only``, ``int8-dynamic`` and ``int4-weight-only`` on torchao's tensor subclasses.

Each decoder linear (and ``lm_head`` with ``quantize_lm_head``) keeps its ``nn.Linear`` module; its
``weight`` becomes a torchao tensor subclass whose ``F.linear`` runs torchao's CPU path:

The int8 methods leave the first and last ``float_edge_layers`` decoder layers in float (measured
the most sensitive on SmolLM2); ``keep_float`` names more layers by pattern.

* ``int8-weight-only``: :class:`torchao.quantization.Int8Tensor`, int8 per output channel
  (symmetric, scale ``max|w| / 127``: no weight is clipped); activations stay float, the matmul
  multiplies by the int8 weight cast to the compute dtype and rescales per channel. With
  ``weight_only_compute: bfloat16`` the same tensors run on aten's CPU int8 weight-only kernel
  (``_weight_int8pack_mm``) with bf16 activations: faster at decode, activations rounded to bf16. A bf16
  model's layers always run there (torchao's eager path casts the whole int8 weight to bf16 per call); a
  float32 model's default path casts it to float32 per call (aten has no fast fp32-activation int8 kernel).
* ``int8-dynamic``: the same int8 weights plus per-token dynamic symmetric int8 activations
  (``Int8DynamicActivationInt8WeightConfig``'s scheme); int8 x int8 -> int32 matmul. Replaces the
  old ``dynamic-int8`` (``torch.ao.quantization``'s fbgemm kernel with *one* activation scale per
  call, deprecated by PyTorch); that name is still accepted and maps here, and versions saved
  under it load onto these kernels (their int8 weights and scales are the same tensors).
* ``int4-weight-only``: torchao's CPU int4 tensor (``Int4OpaqueTensor``, asymmetric, groups of
  ``block_size`` input channels, tinygemm or HQQ parameters) on ``aten._weight_int4pack_mm_for_cpu``.
  That kernel is fast only with bf16 activations, so these layers compute in bf16 (inputs cast in,
  outputs cast back to the model's dtype).

Saved as safetensors only: every torchao tensor is written as its plain inner tensors
(``<layer>.weight.qdata``, ``.scale``, ...) and rebuilt from them at load by the same constructors,
from the layer list in the recipe; nothing is unpickled and nothing is re-quantized.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

METHODS = ("int8-weight-only", "int8-dynamic", "int4-weight-only")
LEGACY_DYNAMIC = "dynamic-int8"  # the torch.ao.quantization method this backend replaced
FORMAT = "torchao"
_INT4_GROUPS = (32, 64, 128)


def _import_torchao() -> Any:
    """torchao, with its import-time noise about optional CUDA extensions silenced."""
    import warnings

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torchao
            import torchao.prototype.quantization.int4.int4_opaque_tensor  # noqa: F401
            import torchao.quantization  # noqa: F401
    finally:
        root.setLevel(level)
    return torchao


def quantized_linear_names(model: Any, *, lm_head: bool) -> list[str]:
    """The decoder linears, plus ``lm_head`` when asked (and when it is an ``nn.Linear``)."""
    from torch import nn

    from llmstack.quantize._int8 import decoder_linear_names

    names = decoder_linear_names(model)
    if lm_head and isinstance(getattr(model, "lm_head", None), nn.Linear):
        names.append("lm_head")
    return names


# ----------------------------------------------------------------------------- tensors


def int8_weight(weight: Any, *, dynamic_activations: bool) -> Any:
    """``weight [out, in]`` as a torchao ``Int8Tensor``: int8 per output channel, scale ``max|w| / 127``.

    torchao's own scale choice (``max|w| / 127.5`` on [-128, 127]) clips each row's largest positive
    weight; on SmolLM2 that alone moved held-out perplexity by 0.3%, so the scale is given here.
    """
    import torch
    from torchao.quantization import Int8Tensor, MappingType, PerRow
    from torchao.quantization.quantize_.workflows import QuantizeTensorToInt8Kwargs

    w = weight.detach()
    scale = (w.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127.0)
    act = (QuantizeTensorToInt8Kwargs(granularity=PerRow(), mapping_type=MappingType.SYMMETRIC)
           if dynamic_activations else None)
    return Int8Tensor.from_hp(w, PerRow(), scale=scale.to(torch.float32), act_quant_kwargs=act)


def int4_weight(weight: Any, *, group_size: int, algorithm: str) -> Any:
    """``weight [out, in]`` as torchao's CPU int4 tensor (bf16 scales and zero points per group)."""
    import torch
    from torchao.prototype.quantization.int4.int4_opaque_tensor import Int4OpaqueTensor
    from torchao.quantization.quantize_.workflows import Int4ChooseQParamsAlgorithm

    alg = Int4ChooseQParamsAlgorithm.HQQ if algorithm == "hqq" else Int4ChooseQParamsAlgorithm.TINYGEMM
    return Int4OpaqueTensor.from_hp(weight.detach().to(torch.bfloat16), [1, group_size],
                                    int4_choose_qparams_algorithm=alg)


def _set_weight(module: Any, tensor: Any) -> None:
    import torch

    module.weight = torch.nn.Parameter(tensor, requires_grad=False)


def _compute_in(module: Any, dtype: Any, io_dtype: Any) -> None:
    """Run ``module`` in ``dtype``: inputs cast in, outputs cast back to ``io_dtype`` (state_dict unchanged)."""
    import torch

    if getattr(module, "_llmstack_compute_hooks", None):
        return
    pre = module.register_forward_pre_hook(lambda _m, args: (args[0].to(dtype), *args[1:]))
    post = module.register_forward_hook(lambda _m, _args, out: out.to(io_dtype))
    module._llmstack_compute_hooks = (pre, post)
    if module.bias is not None:
        module.bias = torch.nn.Parameter(module.bias.detach().to(dtype), requires_grad=False)
        module.bias._llmstack_compute_dtype = True  # quantize() leaves it in this dtype


def _int8pack_forward(self: Any, x: Any) -> Any:
    """``int8-weight-only`` with bf16 compute: aten's CPU int8 weight-only kernel on the Int8Tensor's data
    (:func:`llmstack.models.int8pack.int8pack_linear`: unit kernel scales, the fp32 ones applied after)."""
    from llmstack.models.int8pack import int8pack_linear

    return int8pack_linear(x, self.weight.qdata, self._llmstack_unit_scale, self.weight.scale, self.bias)


def _use_int8pack(module: Any) -> None:
    """Route ``module`` (weight: a weight-only Int8Tensor) through :func:`_int8pack_forward`."""
    import types

    import torch

    from llmstack.models.int8pack import UNIT_SCALE_ATTR

    ones = torch.ones(module.weight.shape[0], dtype=torch.bfloat16)
    module.register_buffer(UNIT_SCALE_ATTR, ones, persistent=False)
    module.forward = types.MethodType(_int8pack_forward, module)


def is_torchao_tensor(tensor: Any) -> bool:
    """True for a torchao tensor subclass (its bytes are its inner tensors, not its nominal shape)."""
    return hasattr(tensor, "tensor_data_names") and type(tensor).__module__.startswith("torchao")


def inner_tensors(tensor: Any) -> dict[str, Any]:
    """The plain tensors a torchao tensor is made of (required ones, then the optional ones present)."""
    names = list(tensor.tensor_data_names) + list(getattr(tensor, "optional_tensor_data_names", []))
    return {n: getattr(tensor, n) for n in names if getattr(tensor, n, None) is not None}


# ----------------------------------------------------------------------------- backend


class TorchaoBackend:
    methods = (*METHODS, LEGACY_DYNAMIC)
    format = FORMAT
    needs_calibration: tuple[str, ...] = ()

    def hardware_problem(self, method: str, config: Any) -> str | None:
        import torch

        if getattr(config, "device", "cpu") != "cpu":
            return f"{method} runs torchao's CPU kernels here; it cannot run on {config.device}"
        try:
            _import_torchao()
        except Exception as exc:
            return f"torchao cannot be imported ({type(exc).__name__}: {exc}); pip install torchao"
        try:  # one tiny layer through the real kernel
            probe = torch.nn.Linear(64, 16, bias=False)
            x = torch.randn(2, 64)
            if method.startswith("int4"):
                _set_weight(probe, int4_weight(probe.weight, group_size=32, algorithm="tinygemm"))
                x = x.to(torch.bfloat16)
            else:
                _set_weight(probe, int8_weight(probe.weight, dynamic_activations=method != "int8-weight-only"))
            with torch.inference_mode():
                probe(x)
        except Exception as exc:
            return f"torchao's {method} CPU kernel fails on this machine ({type(exc).__name__}: {exc})"
        return None

    def architecture_problems(self, skeleton: Any, method: str) -> list[str]:
        from llmstack.quantize._int8 import decoder_linear_names

        names = decoder_linear_names(skeleton)
        if not names:
            return [f"{type(skeleton).__name__} has no nn.Linear layers in a decoder stack (model.layers)"]
        if method.startswith("int4"):
            widths = sorted({skeleton.get_submodule(n).in_features for n in names})
            if all(w % min(_INT4_GROUPS) for w in widths):
                return [f"int4-weight-only needs input widths divisible by a group size in {_INT4_GROUPS}; "
                        f"{type(skeleton).__name__} has {widths}"]
        return []

    def quantize(self, model: Any, *, method: str, source_dir: Path, config: Any, calibration: Any,
                 progress: Callable[[str], None]) -> tuple[Any, dict[str, Any]]:
        import torch

        _import_torchao()
        method = METHODS[1] if method == LEGACY_DYNAMIC else method
        names = quantized_linear_names(model, lm_head=config.torchao.quantize_lm_head)
        keep = _matching(names, config.torchao.keep_float or [])
        if method.startswith("int8"):
            keep += [n for n in _edge_layers(names, config.torchao.float_edge_layers) if n not in keep]
        names = [n for n in names if n not in keep]
        if "lm_head" in names and model.get_output_embeddings() is model.lm_head:
            model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # untie first
        details: dict[str, Any] = {"method": method, "keep_float": keep, "torchao": _torchao_version()}
        if method.startswith("int8"):
            dynamic = method == "int8-dynamic"
            model_dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
            # a bf16 model's weight-only layers take aten's fused kernel too (torchao's eager path would cast the
            # whole int8 weight to bf16 at every call)
            bf16 = not dynamic and (config.torchao.weight_only_compute == "bfloat16" or model_dtype == torch.bfloat16)
            for name in names:
                module = model.get_submodule(name)
                _set_weight(module, int8_weight(module.weight, dynamic_activations=dynamic))
                if bf16:
                    _use_int8pack(module)
            details.update(weights="int8 per output channel, symmetric, scale max|w|/127",
                           activations=("int8 per token, dynamic, symmetric" if dynamic
                                        else "bf16 (weight-only)" if bf16 else "float (weight-only)"),
                           kernel=("aten._weight_int8pack_mm (bf16 activations), fp32 scales" if bf16
                                   else "torchao Int8Tensor (eager CPU path)"),
                           compute_dtype=None, int8pack=bf16)
        else:
            group, algorithm = config.torchao.group_size, config.torchao.int4_algorithm
            io_dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
            skipped = []
            for name in names:
                module = model.get_submodule(name)
                if module.in_features % group:
                    skipped.append(name)  # width not divisible by the group: stays float
                    continue
                _set_weight(module, int4_weight(module.weight, group_size=group, algorithm=algorithm))
                _compute_in(module, torch.bfloat16, io_dtype)
            names = [n for n in names if n not in skipped]
            details.update(weights=f"int4 asymmetric, groups of {group} input channels, bf16 scales/zeros "
                                   f"({algorithm})", group_size=group, algorithm=algorithm,
                           activations="bf16 (weight-only)", kernel="aten._weight_int4pack_mm_for_cpu",
                           compute_dtype="bfloat16", skipped_width=skipped)
        details["layers"] = {name: _describe(model.get_submodule(name).weight) for name in names}
        progress(f"{method}: {len(names)} linear layers quantized")
        return model, details

    def save(self, model: Any, directory: Path) -> None:
        save_torchao_model(model, directory)

    def load(self, directory: Path, recipe: dict[str, Any]) -> Any:
        if recipe.get("format") != FORMAT:  # a dynamic-int8 version saved by the old torch.ao backend
            return _load_legacy_dynamic(directory, recipe)
        return load_torchao_model(directory, recipe)


def _matching(names: list[str], patterns: list[str]) -> list[str]:
    from fnmatch import fnmatchcase

    return [n for n in names if any(fnmatchcase(n, p) for p in patterns)]


def _edge_layers(names: list[str], edge: int) -> list[str]:
    """The linears of the first and last ``edge`` decoder layers: on SmolLM2 leaving the first and last layer
    in float halved int8-weight-only's perplexity loss (1.0030x -> 1.0016x) for 2 of its 30 layers."""
    import re

    index = {n: int(m.group(1)) for n in names if (m := re.search(r"\.layers\.(\d+)\.", f".{n}"))}
    if not edge or not index:
        return []
    last = max(index.values())
    return [n for n, i in index.items() if i < edge or i > last - edge]


def _describe(tensor: Any) -> dict[str, Any]:
    """What :func:`_rebuild_tensor` needs besides the inner tensors (plain JSON)."""
    info: dict[str, Any] = {"type": type(tensor).__name__, "shape": list(tensor.shape),
                            "block_size": [int(b) for b in tensor.block_size],
                            "dtype": str(tensor.dtype).split(".")[-1]}
    if type(tensor).__name__ == "Int8Tensor":
        info["dynamic_activations"] = tensor.act_quant_kwargs is not None
    return info


def _rebuild_tensor(info: dict[str, Any], parts: dict[str, Any]) -> Any:
    import torch

    kind = info["type"]
    if kind == "Int8Tensor":
        from torchao.quantization import Int8Tensor, MappingType, PerRow
        from torchao.quantization.quantize_.workflows import QuantizeTensorToInt8Kwargs

        act = (QuantizeTensorToInt8Kwargs(granularity=PerRow(), mapping_type=MappingType.SYMMETRIC)
               if info.get("dynamic_activations") else None)
        return Int8Tensor(parts.pop("qdata"), parts.pop("scale"), info["block_size"], getattr(torch, info["dtype"]),
                          zero_point=parts.pop("zero_point", None), act_quant_kwargs=act)
    if kind == "Int4OpaqueTensor":
        from torchao.prototype.quantization.int4.int4_opaque_tensor import Int4OpaqueTensor

        return Int4OpaqueTensor(parts.pop("qdata"), parts.pop("scale_and_zero"), info["block_size"],
                                torch.Size(info["shape"]))
    raise ValueError(f"unknown torchao tensor type {kind!r} in the recipe")


# ----------------------------------------------------------------------------- safetensors


def save_torchao_model(model: Any, directory: Path) -> None:
    """config.json (``quant_method: llmstack-torchao``) and model.safetensors of plain tensors only.

    A torchao tensor ``k`` is stored as ``k.<inner name>`` for each inner tensor; tied weights are
    stored once (the second name is restored by the model's tying at load).
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config["quantization_config"] = {"quant_method": "llmstack-torchao",
                                     "note": "load with llmstack.models.load_artifact"}
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(str(directory))
    flat: dict[str, Any] = {}
    seen: set[tuple[int, tuple[int, ...], Any]] = set()
    for key, tensor in model.state_dict().items():
        if is_torchao_tensor(tensor):
            for part, value in inner_tensors(tensor).items():
                flat[f"{key}.{part}"] = value.detach().contiguous().clone()
            continue
        ident = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype)
        if ident in seen:
            continue  # tied alias (lm_head.weight = embed_tokens.weight)
        seen.add(ident)
        flat[key] = tensor.detach().contiguous()
    save_file(flat, str(directory / "model.safetensors"), metadata={"format": "pt", "llmstack": FORMAT})


def _float_skeleton(directory: Path, dtype: str) -> Any:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(directory))
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.random.fork_rng(devices=[]):
        return AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))


def _load_rest(model: Any, tensors: dict[str, Any], quantized: set[str], where: Path) -> None:
    """Load the plain tensors; anything missing must be a quantized weight or a tied alias."""
    loaded_ptrs = set()
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    for key in tensors:
        loaded_ptrs.add(model.state_dict()[key].data_ptr())
    state = model.state_dict()
    untied = [k for k in missing if k not in quantized and state[k].data_ptr() not in loaded_ptrs]
    if unexpected or untied:
        raise ValueError(f"{where}/model.safetensors does not match the model: unexpected {sorted(unexpected)[:5]}, "
                         f"missing {sorted(untied)[:5]}")


def load_torchao_model(directory: Path, recipe: dict[str, Any]) -> Any:
    """Rebuild a model saved by :func:`save_torchao_model` from its recipe's layer list."""
    import torch
    from safetensors import safe_open

    _import_torchao()
    directory = Path(directory)
    details = recipe.get("details", {})
    model = _float_skeleton(directory, recipe.get("dtype", "float32"))
    layers: dict[str, dict[str, Any]] = details.get("layers", {})
    with safe_open(str(directory / "model.safetensors"), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    if "lm_head" in layers and model.get_output_embeddings() is model.lm_head:
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # untie, as when saved
    io_dtype = getattr(torch, recipe.get("dtype", "float32"))
    for name, info in layers.items():
        prefix = f"{name}.weight."
        # clone: a tensor read from the file may sit at an unaligned offset, which aten's int8 CPU kernel
        # does not survive (segfault); a fresh allocation is aligned
        parts = {k[len(prefix):]: tensors.pop(k).clone() for k in list(tensors) if k.startswith(prefix)}
        module = model.get_submodule(name)
        _set_weight(module, _rebuild_tensor(info, parts))
        if parts:
            raise ValueError(f"{directory}: unexpected tensors {sorted(parts)} for {name}.weight")
        if details.get("compute_dtype"):
            _compute_in(module, getattr(torch, details["compute_dtype"]), io_dtype)
        if details.get("int8pack") or (io_dtype == torch.bfloat16 and details.get("method") == "int8-weight-only"):
            _use_int8pack(module)  # bf16 versions saved before int8pack was their default take it too
    _load_rest(model, tensors, {f"{n}.weight" for n in layers}, directory)
    model.eval()
    return model


def _load_legacy_dynamic(directory: Path, recipe: dict[str, Any]) -> Any:
    """A ``dynamic-int8`` version of the old torch.ao backend: its int8 weights + scales onto Int8Tensor.

    The stored tensors are the same per-channel symmetric int8 weights (scale ``max|w| / 127``); they
    now run with per-token dynamic activations instead of the old per-tensor ones.
    """
    import torch
    from safetensors import safe_open
    from torchao.quantization import Int8Tensor, MappingType, PerRow
    from torchao.quantization.quantize_.workflows import QuantizeTensorToInt8Kwargs

    _import_torchao()
    directory = Path(directory)
    dtype = recipe.get("dtype", "float32")
    model = _float_skeleton(directory, dtype)
    with safe_open(str(directory / "model.safetensors"), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    layers = recipe.get("details", {}).get("layers", [])
    act = QuantizeTensorToInt8Kwargs(granularity=PerRow(), mapping_type=MappingType.SYMMETRIC)
    for name in layers:
        qdata, scale = tensors.pop(f"{name}.weight"), tensors.pop(f"{name}.weight_scale").float()[:, None]
        weight = Int8Tensor(qdata, scale, [1, qdata.shape[1]], getattr(torch, dtype),
                            zero_point=torch.zeros_like(scale, dtype=torch.int8), act_quant_kwargs=act)
        _set_weight(model.get_submodule(name), weight)
    _load_rest(model, tensors, {f"{n}.weight" for n in layers}, directory)
    model.eval()
    return model


def _torchao_version() -> str:
    import torchao

    return str(torchao.__version__)


BACKEND = TorchaoBackend()
