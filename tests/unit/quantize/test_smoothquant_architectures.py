"""SmoothQuant folds only into norms it knows (LLaMA's weight * x, Gemma's (1 + weight) * x, LayerNorm with bias),
only where the norm feeds the projections, and refuses anything else by class and path."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from llmstack.errors import ConfigError
from llmstack.quantize.smoothquant import collect_activation_maxima, layout_problems, norm_fold, smooth_model


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from llmstack.data import train_tokenizer
    from llmstack.serve._testing import DOCS

    return train_tokenizer(DOCS, vocab_size=320)


def stablelm(tokenizer: Any) -> Any:
    """A LLaMA-layout decoder whose norms are LayerNorms with a bias (StableLM, sequential residual)."""
    from transformers import StableLmConfig, StableLmForCausalLM

    config = StableLmConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                            use_parallel_residual=False, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    torch.manual_seed(0)
    return StableLmForCausalLM(config).eval()


def build(architecture: str, tokenizer: Any) -> Any:
    from llmstack.serve._testing import tiny_causal_lm

    model = stablelm(tokenizer) if architecture == "stablelm" else tiny_causal_lm(architecture, tokenizer)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # norms away from their init (Gemma's zeros, LLaMA's ones) so a wrong fold shows
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.3)
    return model


@pytest.mark.parametrize("architecture, offset, mlp_norm", [("llama", 0.0, "post_attention_layernorm"),
                                                           ("gemma3", 1.0, "pre_feedforward_layernorm"),
                                                           ("stablelm", 0.0, "post_attention_layernorm")])
def test_smoothing_leaves_the_float_output_unchanged(tokenizer: Any, architecture: str, offset: float,
                                                     mlp_norm: str) -> None:
    model = build(architecture, tokenizer)
    layer = model.model.layers[0]
    assert norm_fold(layer.input_layernorm, "input_layernorm").offset == offset
    blocks = torch.randint(3, len(tokenizer), (4, 24), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        before = model(input_ids=blocks, use_cache=False).logits
    untouched = {n: p.clone() for n, p in model.named_parameters() if "norm" in n and mlp_norm not in n
                 and "input_layernorm" not in n}
    folded = {n: p.clone() for n, p in model.named_parameters() if mlp_norm in n or "input_layernorm" in n}
    smooth_model(model, collect_activation_maxima(model, blocks), alpha=0.5)
    params = dict(model.named_parameters())
    assert all(not torch.equal(params[n], p) for n, p in folded.items())  # the scales went into these norms
    assert all(torch.equal(params[n], p) for n, p in untouched.items())  # e.g. Gemma's post-attention norm
    with torch.inference_mode():
        after = model(input_ids=blocks, use_cache=False).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


class SquaredScaleNorm(torch.nn.Module):
    """A norm SmoothQuant does not know: its scale is weight squared."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(hidden))

    def forward(self, x: Any) -> Any:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight ** 2


def test_an_unknown_norm_is_refused_by_class_and_path(tokenizer: Any) -> None:
    model = build("llama", tokenizer)
    model.model.layers[1].input_layernorm = SquaredScaleNorm(64)
    problems = layout_problems(model, need_norms=True)
    assert problems == []  # layer 0 is fine; the whole model is checked when smoothing
    reference = copy.deepcopy(model.state_dict())
    blocks = torch.randint(3, len(tokenizer), (2, 16), generator=torch.Generator().manual_seed(3))
    with pytest.raises(ConfigError) as info:
        smooth_model(model, collect_activation_maxima(model, blocks), alpha=0.5)
    assert "model.layers.1.input_layernorm (SquaredScaleNorm)" in str(info.value)
    assert all(torch.equal(t, reference[k]) for k, t in model.state_dict().items())  # refused before any change
    model.model.layers[0].post_attention_layernorm = SquaredScaleNorm(64)
    assert any("model.layers.0.post_attention_layernorm (SquaredScaleNorm)" in p
               for p in layout_problems(model, need_norms=True))


def test_a_norm_that_does_not_feed_the_projections_is_refused(tokenizer: Any) -> None:
    """The MLP scales its input between the norm and gate_proj: a scale folded into the norm would change the model."""
    model = build("llama", tokenizer)
    mlp = model.model.layers[1].mlp
    mlp.forward = lambda x, forward=mlp.forward: forward(2.0 * x)
    blocks = torch.randint(3, len(tokenizer), (2, 16), generator=torch.Generator().manual_seed(4))
    with pytest.raises(ConfigError) as info:
        smooth_model(model, collect_activation_maxima(model, blocks), alpha=0.5)
    assert ("model.layers.1.post_attention_layernorm (LlamaRMSNorm): its output is not the input of "
            "model.layers.1.mlp.gate_proj") in str(info.value)


def test_a_missing_norm_is_refused_by_path(tokenizer: Any) -> None:
    """OLMo-2 normalises after attention and MLP, with no norm in front of either: nothing to fold into."""
    from transformers import Olmo2Config, Olmo2ForCausalLM

    config = Olmo2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    model = Olmo2ForCausalLM(config).eval()
    assert any("input_layernorm" in p for p in layout_problems(model, need_norms=True))
    blocks = torch.randint(3, len(tokenizer), (2, 16), generator=torch.Generator().manual_seed(4))
    with pytest.raises(ConfigError, match="model.layers.0.input_layernorm does not exist"):
        smooth_model(model, collect_activation_maxima(model, blocks), alpha=0.5)
