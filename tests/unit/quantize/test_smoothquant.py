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


# Injected outlier strength. The tiny model is barely trained (loss ~5 nats), so its loss hardly
# reacts to input noise: at 60x naive W8A8 moved the loss by ~0.002 nats, below the run-to-run noise
# of the int8 rounding, and the sign flipped between machines. At 1000x naive W8A8 loses >= 0.25 nats
# on every model variant probed (training seeds 0-1, 40-80 documents), while smoothing, which undoes
# this injection exactly, stays within 0.001 nats.
OUTLIER_FACTOR = 1000.0
OUTLIER_CHANNELS = [3, 70]


def _kl_from_float(reference: Any, candidate: Any, blocks: Any) -> float:
    """Mean per-token KL(reference || candidate) of the next-token distributions on ``blocks``."""
    with torch.inference_mode():
        ref = reference(input_ids=blocks, use_cache=False).logits.float().log_softmax(-1)
        cand = candidate(input_ids=blocks, use_cache=False).logits.float().log_softmax(-1)
    return float((ref.exp() * (ref - cand)).sum(-1).mean())


def test_smoothquant_beats_naive_w8a8_when_activations_have_outliers(trained_tiny: tuple[Any, Any],
                                                                     calib: Any) -> None:
    base = copy.deepcopy(trained_tiny[0])
    _inject_outliers(base, channels=OUTLIER_CHANNELS, factor=OUTLIER_FACTOR)
    fp_loss = calibration_loss(base, calib)
    naive = copy.deepcopy(base)
    quantize_linears(naive)
    smooth = copy.deepcopy(base)
    smooth_model(smooth, collect_activation_maxima(smooth, calib), alpha=0.5)
    quantize_linears(smooth)
    naive_gap = calibration_loss(naive, calib) - fp_loss
    smooth_gap = calibration_loss(smooth, calib) - fp_loss
    # naive W8A8 measurably degrades: per-token scales are set by the outlier channels
    assert naive_gap > 0.1, f"naive W8A8 lost only {naive_gap:.4f} nats at {OUTLIER_FACTOR:g}x outliers"
    # smoothing migrates the outliers into the weights and keeps the float model's loss
    assert abs(smooth_gap) < 0.02, (smooth_gap, naive_gap)
    assert smooth_gap < 0.1 * naive_gap, (smooth_gap, naive_gap)
    # and the smoothed model's predictions stay far closer to the float model's
    naive_kl, smooth_kl = _kl_from_float(base, naive, calib), _kl_from_float(base, smooth, calib)
    assert smooth_kl < 0.01 * naive_kl, (smooth_kl, naive_kl)


def test_layout_check_names_what_is_missing() -> None:
    from transformers import OlmoConfig, OlmoForCausalLM

    with torch.device("meta"):
        olmo = OlmoForCausalLM(OlmoConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                          num_attention_heads=2, intermediate_size=64, eos_token_id=1,
                                          pad_token_id=0, bos_token_id=2))
    problems = layout_problems(olmo, need_norms=True)
    assert any("input_layernorm" in p and "RMSNorm" in p for p in problems)
    assert layout_problems(olmo, need_norms=False) == []  # naive W8A8 needs no norms
