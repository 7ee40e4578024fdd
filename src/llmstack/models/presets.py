"""LLaMA-architecture presets, small enough to train on a CPU.

Each preset is a plain dict of ``transformers.LlamaConfig`` arguments; the vocabulary size
comes from the tokenizer at build time. Parameter counts are for a 4096-token vocabulary.
"""

from __future__ import annotations

from typing import Any

from llmstack.errors import ConfigError

PRESETS: dict[str, dict[str, Any]] = {
    # ~1.9M parameters: unit tests, the quickstart, CI.
    "tiny": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=384, max_position_embeddings=256),
    # ~29M parameters: fine-tuning and quantization studies on a CPU.
    "small": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                  intermediate_size=1536, max_position_embeddings=512),
    # ~107M parameters: throughput and speed benchmarks.
    "base": dict(hidden_size=768, num_hidden_layers=16, num_attention_heads=12, num_key_value_heads=4,
                 intermediate_size=2048, max_position_embeddings=1024),
}

_COMMON: dict[str, Any] = dict(hidden_act="silu", rms_norm_eps=1e-5, rope_theta=10000.0,
                               tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
                               bos_token_id=None, eos_token_id=None, pad_token_id=None)


def preset_config(name: str, *, vocab_size: int, max_seq_len: int | None = None,
                  bos_token_id: int | None = None, eos_token_id: int | None = None,
                  pad_token_id: int | None = None) -> Any:
    """A ``LlamaConfig`` for preset ``name`` with the tokenizer's vocabulary and special ids."""
    from transformers import LlamaConfig

    if name not in PRESETS:
        raise ConfigError(f"model.preset: unknown preset {name!r}; known: {', '.join(PRESETS)}")
    kwargs = {**_COMMON, **PRESETS[name], "vocab_size": vocab_size,
              "bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id}
    if max_seq_len is not None:
        kwargs["max_position_embeddings"] = max_seq_len
    return LlamaConfig(**kwargs)


def build_model(name: str, *, vocab_size: int, max_seq_len: int | None = None, seed: int = 0,
                tokenizer: Any = None) -> Any:
    """A freshly initialised ``LlamaForCausalLM`` for preset ``name`` (deterministic for a seed).

    Example:
        >>> model = build_model("tiny", vocab_size=512)
        >>> sum(p.numel() for p in model.parameters()) > 0
        True
    """
    import torch
    from transformers import LlamaForCausalLM

    special = {}
    if tokenizer is not None:
        special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    config = preset_config(name, vocab_size=vocab_size, max_seq_len=max_seq_len, **special)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


def count_parameters(model: Any, *, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
