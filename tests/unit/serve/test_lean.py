"""The lean LLaMA-family forward (serve/engine/lean.py): transformers' logits from fused projections, over the
engine's own KV cache, for prefill with padding and for decode; the engine serves the same tokens with it."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from engine_helpers import greedy, served
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

from llmstack.serve.engine.kv import new_cache
from llmstack.serve.engine.lean import FusedLinear, LeanForward, decode_attention, lean_unsupported

SHAPE = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)


def llama(**overrides: Any) -> Any:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**{**SHAPE, **overrides})).eval()


def qwen2() -> Any:
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(**SHAPE)).eval()  # biases on q, k and v


def decode_both(model: Any, *, pack: bool, steps: int = 4,
                padded: bool = True) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(transformers' logits, the lean forward's) for a prefill (left-padded unless not ``padded``: then plainly
    causal) and ``steps`` greedy decode steps."""
    reference = model
    lean = LeanForward(copy.deepcopy(model), pack=pack)
    ids = torch.randint(3, 300, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 9, dtype=torch.long)
    if padded:
        mask[0, :4] = 0  # left padding of different widths
        mask[2, :7] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    theirs, ours = new_cache(model.config), new_cache(model.config)
    pairs = []
    with torch.no_grad():
        for _ in range(steps + 1):
            expected = reference(input_ids=ids, attention_mask=mask, position_ids=positions, cache=theirs,
                                 use_cache=True, logits_to_keep=1).logits
            got = lean(ids, mask, positions, ours)
            pairs.append((expected, got))
            ids = expected[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], dim=1)
            positions = positions[:, -1:] + 1
    real = mask[:, :-1].bool()  # the engine's cache holds the same keys and values (padding columns: unused)
    # bf16: attention rounds differently from transformers' SDPA kernel, so later layers' keys move by bf16 ulps
    tolerance = 1e-4 if model.dtype == torch.float32 else 2e-2
    for a, b in zip(theirs.layers, ours.layers):
        for got, expected in ((b.keys, a.keys), (b.values, a.values)):
            torch.testing.assert_close(got.transpose(1, 2)[real], expected.transpose(1, 2)[real], atol=tolerance,
                                       rtol=tolerance)
    return pairs


@pytest.mark.parametrize("build", [llama, qwen2], ids=["llama-gqa", "qwen2-bias"])
@pytest.mark.parametrize("pack", [False, True], ids=["plain", "packed"])
@pytest.mark.parametrize("padded", [True, False], ids=["left-padded", "causal"])
def test_the_lean_forward_gives_transformers_logits(build: Any, pack: bool, padded: bool) -> None:
    for expected, got in decode_both(build(), pack=pack, padded=padded):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_bf16_stays_near_transformers_bf16() -> None:
    model = llama().to(torch.bfloat16)
    for expected, got in decode_both(model, pack=True):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), expected.float(), atol=0.05, rtol=0.05)


@pytest.mark.parametrize("kv_heads", [3, 1, 9], ids=["gqa", "mqa", "mha"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_decode_attention_equals_sdpa_with_padding(kv_heads: int, dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(4, 9, 1, 16, generator=generator).to(dtype)
    keys, values = (torch.randn(4, kv_heads, 11, 16, generator=generator).to(dtype) for _ in range(2))
    real = torch.ones(4, 11, dtype=torch.long)
    real[1, :6] = 0  # left padding
    real[3, :10] = 0  # only the new token is real
    bias = torch.zeros(4, 1, 1, 11).masked_fill_(~real.bool()[:, None, None, :], float("-inf"))
    expected = torch.nn.functional.scaled_dot_product_attention(
        query.float(), keys.float(), values.float(), attn_mask=real.bool()[:, None, None, :], scale=0.3,
        enable_gqa=kv_heads != 9).transpose(1, 2)
    got = decode_attention(query, keys, values, bias, 0.3)
    assert got.dtype == dtype and got.shape == (4, 1, 9, 16)
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.float(), expected, atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(got[3].float(), values[3, :, -1:].float().repeat_interleave(9 // kv_heads, 0)
                               .transpose(0, 1), atol=tolerance, rtol=tolerance)  # sees only its own token


def test_layers_that_cannot_fuse_keep_their_own_kernels() -> None:
    class Marked(torch.Tensor):  # stands for a quantized weight tensor subclass (torchao's)
        pass

    q, k = torch.nn.Linear(8, 6), torch.nn.Linear(8, 4, bias=False)
    k.weight = torch.nn.Parameter(k.weight.detach().as_subclass(Marked))
    fused = FusedLinear([q, k], pack=True)
    assert fused.parts is not None  # not concatenated: each layer runs as it is
    x = torch.randn(2, 8)
    torch.testing.assert_close(fused(x), torch.cat([q(x), k(x)], dim=-1))
    plain = FusedLinear([torch.nn.Linear(8, 6), torch.nn.Linear(8, 4, bias=False)], pack=False)
    assert plain.parts is None and plain.bias is not None and plain.bias[6:].eq(0).all()


def test_models_it_does_not_cover_say_why() -> None:
    assert "not a LLaMA-family" in lean_unsupported(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2)))
    assert "sliding" in lean_unsupported(MistralForCausalLM(MistralConfig(**SHAPE, sliding_window=16)))
    assert "hidden_act" in lean_unsupported(llama(hidden_act="gelu"))
    assert lean_unsupported(llama()) is None
    with pytest.raises(ValueError, match="not a LLaMA-family"):
        LeanForward(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2)))


def test_the_model_own_forward_says_its_weights_moved() -> None:
    model = llama()
    LeanForward(model)
    with pytest.raises(RuntimeError, match="lean forward"):
        model(torch.tensor([[1, 2, 3]]))


def test_a_lean_engine_decodes_what_transformers_forward_does(tiny: tuple[Any, Any]) -> None:
    prompts = ["def add(a, b):", "import os", "class Config:", "x = [i for i in", "def add(a, b):\n    return"]
    plain = served(tiny, prepack_weights=True)
    lean = served(tiny, prepack_weights=True, lean_forward=True, prefix_cache_mb=8)
    try:
        assert plain.stats["lean_forward"] == 0 and lean.stats["lean_forward"] == 1
        assert lean.replica_stats()["linear_modules"].get("FusedLinear") == 4 * tiny[0].config.num_hidden_layers
        expected = greedy(plain, prompts, max_tokens=24)
        assert greedy(lean, prompts, max_tokens=24) == expected  # batched: padding, masks, merging and all
        assert greedy(lean, prompts, max_tokens=24) == expected  # again, on the prefix cache's blocks
        assert lean.stats["prefix_hits"] > 0
    finally:
        plain.shutdown()
        lean.shutdown()


def test_an_engine_with_adapters_keeps_transformers_forward(tiny: tuple[Any, Any], adapter_dirs: list[Any]) -> None:
    from llmstack.serve.engine import AdapterSpec
    from llmstack.serve.engine.loading import dir_identity

    adapters = [AdapterSpec("lora-0", str(adapter_dirs[0]), dir_identity(adapter_dirs[0]))]
    engine = served(tiny, adapters=adapters, lean_forward=True)
    try:
        assert engine.stats["lean_forward"] == 0
    finally:
        engine.shutdown()


def test_int8_weight_only_layers_fuse_on_the_int8_kernel(tmp_path: Any) -> None:
    """A bf16 int8-weight-only model (quantize's torchao backend): q/k/v and gate/up fuse into one int8 matmul
    each, with transformers' logits over the same quantized layers."""
    from llmstack.config import QuantizeConfig
    from llmstack.quantize.torchao_backend import BACKEND

    model = llama(num_hidden_layers=4).to(torch.bfloat16)  # the first and last stay float (quantize's default)
    config = QuantizeConfig(method="int8-weight-only", dtype="bfloat16")
    quantized, _ = BACKEND.quantize(model, method="int8-weight-only", source_dir=tmp_path, config=config,
                                    calibration=None, progress=lambda _m: None)
    lean = LeanForward(copy.deepcopy(quantized))
    kinds = [m.kind for m in lean.modules() if isinstance(m, FusedLinear)]
    assert kinds == ["float"] * 4 + ["int8pack"] * 8 + ["float"] * 4, kinds
    for expected, got in decode_both(quantized, pack=True):
        torch.testing.assert_close(got.float(), expected.float(), atol=0.02, rtol=0.02)
