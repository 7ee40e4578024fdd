"""A lean forward pass for LLaMA-family decoders: the same arithmetic as transformers', a fraction of the calls.

transformers' modules spend a decode step of SmolLM2-135M largely in Python (12 of 44 ms in bf16 on a 2-core
EPYC: module calls, hooks, mask building per layer, six projections per layer). :class:`LeanForward` runs the
served model's own weights through a flat loop instead:

- the q/k/v projections fused into one matmul, gate and up into another (weights concatenated once at load,
  prepacked for oneDNN where :mod:`.kernels` can);
- RoPE applied to queries and keys in one pass; one attention mask built per forward, not per layer;
- fused RMSNorm (``F.rms_norm``); a decode step's attention as two batched matmuls per KV head group
  (:func:`decode_attention`), a prefill's through ``scaled_dot_product_attention`` with grouped KV heads;
- the KV cache is the engine's own (:class:`.kv.GrowingLayer`): prefix caching, batch merging and row
  selection work unchanged.

It serves prefill (any number of tokens per row, left-padded) and decode, returning the last position's
logits. Models it does not cover (other architectures, sliding windows, adapters, the compiled path) keep
transformers' forward: :func:`lean_unsupported` says why.
"""

from __future__ import annotations

from typing import Any

import torch  # imported lazily by the engine that builds a lean forward
import torch.nn.functional as F

from llmstack.models.int8pack import int8pack_linear, uses_int8pack
from llmstack.serve.engine.kernels import PLAIN_WEIGHTS, packing_supported
from llmstack.serve.engine.kv import has_sliding_window

LEAN_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


def lean_unsupported(model: Any) -> str | None:
    """None when :class:`LeanForward` computes what ``model``'s own forward does, else why not (one line)."""
    name = type(model).__name__
    if name not in LEAN_ARCHITECTURES:
        return f"{name} is not a LLaMA-family decoder ({', '.join(LEAN_ARCHITECTURES)})"
    config = model.config
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act={config.hidden_act} (the lean forward runs SiLU-gated MLPs)"
    if has_sliding_window(config):
        return "sliding-window attention"
    if getattr(config, "pretraining_tp", 1) != 1:
        return f"pretraining_tp={config.pretraining_tp}"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "rotary_emb") or not hasattr(inner, "layers"):
        return f"{name} has no model.layers / model.rotary_emb"
    for layer in inner.layers:
        attention, mlp = layer.self_attn, layer.mlp
        if not all(hasattr(attention, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")) \
                or not all(hasattr(mlp, p) for p in ("gate_proj", "up_proj", "down_proj")):
            return "a decoder layer without the q/k/v/o and gate/up/down projections"
        if any(hasattr(attention, extra) for extra in ("q_norm", "k_norm")):
            return "query/key norms (not covered)"
        if type(layer.input_layernorm).__name__.endswith("RMSNorm") is False:
            return f"{type(layer.input_layernorm).__name__} (the lean forward runs RMSNorm)"
    return None


class FusedLinear(torch.nn.Module):
    """Several linear layers that read the same input, as one matmul: outputs concatenated in order.

    Plain float weights are concatenated (and prepacked for oneDNN when ``pack``), so are int8 weight-only layers
    on aten's int8 kernel; other layers (other quantized kernels and tensor-subclass weights) stay separate
    modules whose outputs are concatenated.
    """

    def __init__(self, linears: list[Any], *, pack: bool) -> None:
        super().__init__()
        self.in_features = int(linears[0].in_features)
        self.out_features = [int(m.out_features) for m in linears]
        self.kind = _fusable_kind(linears)
        self.parts = torch.nn.ModuleList(linears) if self.kind == "parts" else None
        self.packed = False
        if self.kind == "parts":
            return
        if self.kind == "int8pack":  # int8-weight-only on bf16 (quantize/torchao_backend.py): int8 rows and scales
            weight = torch.cat([m.weight.qdata for m in linears])
            self.register_buffer("scale", torch.cat([m.weight.scale.reshape(-1) for m in linears]).float(),
                                 persistent=False)
            self.register_buffer("unit_scale", torch.ones(weight.shape[0], dtype=torch.bfloat16), persistent=False)
        else:
            weight = torch.cat([m.weight.detach() for m in linears])
            self.packed = pack and weight.device.type == "cpu" and packing_supported(weight.dtype) is None
            if self.packed:
                weight = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        biases = [m.bias for m in linears]
        bias = None if all(b is None for b in biases) else torch.cat([
            b.detach() if b is not None else torch.zeros(m.out_features, dtype=_bias_dtype(biases))
            for b, m in zip(biases, linears)])
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.parts is not None:
            outputs = [part(x) for part in self.parts]
            return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)
        if self.kind == "int8pack":
            return int8pack_linear(x, self.weight, self.unit_scale, self.scale, self.bias)
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def _fusable_kind(linears: list[Any]) -> str:
    """``float`` (plain float weights: concatenated), ``int8pack`` (int8 weight-only layers on aten's int8
    kernel: int8 rows and scales concatenated) or ``parts`` (anything else: each layer runs as it is)."""
    if all(type(m) is torch.nn.Linear and type(m.weight) in PLAIN_WEIGHTS for m in linears):
        dtypes = {m.weight.dtype for m in linears}
        return "float" if len(dtypes) == 1 and next(iter(dtypes)).is_floating_point else "parts"
    if all(type(m) is torch.nn.Linear and uses_int8pack(m) for m in linears):
        return "int8pack"
    return "parts"


def _bias_dtype(biases: list[Any]) -> torch.dtype:
    return next(b.dtype for b in biases if b is not None)


class _Layer:
    __slots__ = ("input_norm", "input_eps", "qkv", "o", "post_norm", "post_eps", "gate_up", "down", "intermediate")

    def __init__(self, layer: Any, *, pack: bool) -> None:
        attention, mlp = layer.self_attn, layer.mlp
        self.input_norm, self.input_eps = layer.input_layernorm.weight, _eps(layer.input_layernorm)
        self.post_norm, self.post_eps = layer.post_attention_layernorm.weight, _eps(layer.post_attention_layernorm)
        self.qkv = FusedLinear([attention.q_proj, attention.k_proj, attention.v_proj], pack=pack)
        self.o = FusedLinear([attention.o_proj], pack=pack)
        self.gate_up = FusedLinear([mlp.gate_proj, mlp.up_proj], pack=pack)
        self.down = FusedLinear([mlp.down_proj], pack=pack)
        self.intermediate = int(mlp.gate_proj.out_features)


def _eps(norm: Any) -> float:
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))


class LeanForward:
    """``model``'s forward pass (LLaMA family, :func:`lean_unsupported` is None) over the engine's KV cache.

    Building it moves the decoder layers' projection weights into fused ones: the model's own forward can no
    longer run (its projections are replaced by :class:`Moved` placeholders that say so).
    """

    def __init__(self, model: Any, *, pack: bool = True) -> None:
        reason = lean_unsupported(model)
        if reason is not None:
            raise ValueError(f"no lean forward for this model: {reason}")
        config = model.config
        inner = model.model
        self.embed = inner.embed_tokens
        self.rotary = inner.rotary_emb
        self.norm, self.norm_eps = inner.norm.weight, _eps(inner.norm)
        self.model = model  # its lm_head is read per call: weight packing may replace it after this
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(getattr(config, "num_key_value_heads", None) or self.heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.heads)
        self.hidden = int(config.hidden_size)
        self.scaling = float(inner.layers[0].self_attn.scaling)
        with torch.no_grad():
            self.layers = [_Layer(layer, pack=pack) for layer in inner.layers]
            for layer in inner.layers:
                for parent, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                                      (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
                    for name in names:
                        setattr(parent, name, Moved())

    def modules(self) -> list[torch.nn.Module]:
        """The fused projections and the layers they hold (for counting what kernels the replica runs)."""
        return [m for layer in self.layers for fused in (layer.qkv, layer.o, layer.gate_up, layer.down)
                for m in fused.modules()]

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                 cache: Any) -> torch.Tensor:
        """Logits ``[B, 1, V]`` of the last position of ``input_ids`` ``[B, T]``.

        ``attention_mask`` ``[B, S]`` covers the cache's columns before this call plus the ``T`` new ones (1 where
        a real token sits); ``position_ids`` ``[B, T]``; ``cache``'s layers receive the new keys and values.
        """
        batch, length = input_ids.shape
        hidden = self.embed(input_ids)
        cos, sin = self.rotary(hidden, position_ids)  # [B, T, D]
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
        # a prefill of whole prompts (no padding, nothing cached before them) is plainly causal: SDPA then skips
        # the masked half instead of reading a [T, T] mask
        causal = length > 1 and attention_mask.shape[1] == length and bool(attention_mask.all())
        mask = None if causal or length == 1 else _attention_mask(attention_mask, length)
        # a decode step attends through two batched matmuls per layer with an additive mask made once here
        decode_bias = _decode_bias(attention_mask) if length == 1 else None
        q_width, k_width = self.heads * self.head_dim, self.kv_heads * self.head_dim
        rotated_heads, half = self.heads + self.kv_heads, self.head_dim // 2
        for layer, kv in zip(self.layers, cache.layers):
            x = F.rms_norm(hidden, (self.hidden,), layer.input_norm, layer.input_eps)
            qkv = layer.qkv(x)
            qk = qkv[..., :q_width + k_width].view(batch, length, rotated_heads, self.head_dim)
            rotated = torch.cat((qk[..., half:].neg(), qk[..., :half]), dim=-1).mul_(sin).add_(qk * cos)
            query = rotated[:, :, :self.heads].transpose(1, 2)
            key = rotated[:, :, self.heads:].transpose(1, 2)
            value = qkv[..., q_width + k_width:].view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
            keys, values = kv.update(key, value)
            if decode_bias is not None:
                attended = decode_attention(query, keys, values, decode_bias, self.scaling)
            else:
                attended = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, is_causal=causal,
                                                          scale=self.scaling, enable_gqa=self.kv_heads != self.heads)
                attended = attended.transpose(1, 2)
            hidden = hidden + layer.o(attended.reshape(batch, length, q_width))
            x = F.rms_norm(hidden, (self.hidden,), layer.post_norm, layer.post_eps)
            gate, up = layer.gate_up(x).split(layer.intermediate, dim=-1)
            hidden = hidden + layer.down(F.silu(gate).mul_(up))
        last = F.rms_norm(hidden[:, -1:], (self.hidden,), self.norm, self.norm_eps)
        return self.model.lm_head(last)


class Moved(torch.nn.Module):
    """Where a projection was before :class:`LeanForward` fused it: calling it is a bug, said plainly."""

    def forward(self, *args: Any) -> None:
        raise RuntimeError("this projection's weights moved into the engine's lean forward (serve/engine/lean.py)")


def decode_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """One decode step's attention, ``[B, 1, H, D]``, for ``query`` ``[B, H, 1, D]`` over ``keys``/``values``
    ``[B, KV, S, D]`` (each KV head serves ``H / KV`` consecutive query heads) and an additive ``bias``
    ``[B, 1, 1, S]`` (0 or -inf).

    The query heads of one KV head form the rows of one matmul, so each key is read once per step. Scores and the
    softmax are fp32 (as transformers' eager attention does for bf16); at decode shapes this is several times
    faster than ``scaled_dot_product_attention``, whose bf16 CPU kernel is slower than its fp32 one.
    """
    batch, heads, _, head_dim = query.shape
    kv_heads = keys.shape[1]
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, head_dim)
    scores = torch.matmul(grouped, keys.transpose(-1, -2)).float().mul_(scale).add_(bias)
    weights = torch.softmax(scores, dim=-1).to(values.dtype)
    return torch.matmul(weights, values).reshape(batch, 1, heads, head_dim)


def _decode_bias(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B, 1, 1, S]`` fp32: 0 on real columns, -inf on padding (the new token's own column is real)."""
    bias = torch.zeros(attention_mask.shape, dtype=torch.float32, device=attention_mask.device)
    return bias.masked_fill_(~attention_mask.bool(), float("-inf"))[:, None, None, :]


def _attention_mask(attention_mask: torch.Tensor, length: int) -> torch.Tensor:
    """``[B, 1, T, S]`` booleans: query ``t`` (column ``S - T + t``) sees real tokens up to its own column,
    and always itself (a padding query then attends to something: no NaN rows)."""
    real = attention_mask.bool()[:, None, None, :]  # [B, 1, 1, S]
    if length == 1:
        return real
    columns = attention_mask.shape[1]
    query_columns = torch.arange(columns - length, columns, device=attention_mask.device)[:, None]  # [T, 1]
    key_columns = torch.arange(columns, device=attention_mask.device)[None, :]  # [1, S]
    return (real & (key_columns <= query_columns)) | (key_columns == query_columns)


__all__ = ["FusedLinear", "LeanForward", "decode_attention", "lean_unsupported"]
