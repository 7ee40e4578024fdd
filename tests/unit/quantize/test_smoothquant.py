"""SmoothQuant: the folded model computes the same function, and smoothing beats naive W8A8 on outliers."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from llmstack.quantize.smoothquant import (calibration_loss, collect_activation_maxima, layout_problems,
                                           quantize_linears, smooth_model)


@pytest.fixture(scope="module")
def calib(held_out: Any) -> Any:
    return held_out


@pytest.mark.parametrize("smooth_outputs", [False, True])
@pytest.mark.parametrize("alpha", [0.5, 0.85])
def test_folding_scales_leaves_outputs_unchanged(trained_tiny: tuple[Any, Any], calib: Any,
                                                 smooth_outputs: bool, alpha: float) -> None:
    model = copy.deepcopy(trained_tiny[0])
    with torch.inference_mode():
        before = model(input_ids=calib, use_cache=False).logits
    act_max = collect_activation_maxima(model, calib)
    norm_before = model.model.layers[0].input_layernorm.weight.clone()
    o_before = model.model.layers[0].self_attn.o_proj.weight.clone()
    smooth_model(model, act_max, alpha=alpha, smooth_outputs=smooth_outputs)
    # the transform really moved scale around ...
    assert not torch.allclose(model.model.layers[0].input_layernorm.weight, norm_before)
    assert torch.allclose(model.model.layers[0].self_attn.o_proj.weight, o_before) != smooth_outputs
    # ... and the float function is the same (tiny has 4 query heads over 2 KV heads: GQA v->o path)
    with torch.inference_mode():
        after = model(input_ids=calib, use_cache=False).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_smoothed_activations_are_flatter(trained_tiny: tuple[Any, Any], calib: Any) -> None:
    model = copy.deepcopy(trained_tiny[0])
    act = collect_activation_maxima(model, calib)
    smooth_model(model, act, alpha=0.5)
    smoothed = collect_activation_maxima(model, calib)
    key = "model.layers.1.self_attn.q_proj"
    ratio = lambda t: float(t.max() / t.mean())  # noqa: E731
    assert ratio(smoothed[key]) < ratio(act[key])


def _inject_outliers(model: Any, channels: list[int], factor: float) -> None:
    """A function-preserving edit that creates LLM-style activation outliers on a few channels."""
    with torch.no_grad():
        for layer in model.model.layers:
            for norm, linears in ((layer.input_layernorm, (layer.self_attn.q_proj, layer.self_attn.k_proj,
                                                           layer.self_attn.v_proj)),
                                  (layer.post_attention_layernorm, (layer.mlp.gate_proj, layer.mlp.up_proj))):
                norm.weight[channels] *= factor
                for lin in linears:
                    lin.weight[:, channels] /= factor


def test_smoothquant_beats_naive_w8a8_when_activations_have_outliers(trained_tiny: tuple[Any, Any],
                                                                     calib: Any) -> None:
    base = copy.deepcopy(trained_tiny[0])
    _inject_outliers(base, channels=[3, 70], factor=60.0)
    fp_loss = calibration_loss(base, calib)
    naive = copy.deepcopy(base)
    quantize_linears(naive)
    smooth = copy.deepcopy(base)
    smooth_model(smooth, collect_activation_maxima(smooth, calib), alpha=0.5)
    quantize_linears(smooth)
    naive_gap = calibration_loss(naive, calib) - fp_loss
    smooth_gap = calibration_loss(smooth, calib) - fp_loss
    assert smooth_gap < 0.5 * naive_gap, (smooth_gap, naive_gap)


def test_layout_check_names_what_is_missing() -> None:
    from transformers import OlmoConfig, OlmoForCausalLM

    with torch.device("meta"):
        olmo = OlmoForCausalLM(OlmoConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                          num_attention_heads=2, intermediate_size=64, eos_token_id=1,
                                          pad_token_id=0, bos_token_id=2))
    problems = layout_problems(olmo, need_norms=True)
    assert any("input_layernorm" in p and "RMSNorm" in p for p in problems)
    assert layout_problems(olmo, need_norms=False) == []  # naive W8A8 needs no norms
