"""A tiny registered model (and LoRA adapters) for serving tests, benchmarks and demos; seconds to build.

Random-initialised weights produce gibberish, but deterministic gibberish: exactly what batching
equivalence, adapter isolation and caching tests need.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

DOCS = [
    "def add(a, b):\n    \"\"\"Return the sum of a and b.\"\"\"\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog.",
    "Ray Serve batches requests to use the hardware well.",
    "import os\nprint(os.getcwd())\n",
] + [f"line {i}: the value of x is {i * 7} and y is {i * 3}." for i in range(60)]


def tiny_model(*, seed: int = 0, vocab_size: int = 320, max_seq_len: int = 256, preset: str = "tiny") -> tuple[Any, Any]:
    """A random-init preset model (``tiny`` by default) and a BPE tokenizer (with chat template) trained on a few lines."""
    from llmstack.data import train_tokenizer
    from llmstack.models import build_model

    tokenizer = train_tokenizer(DOCS, vocab_size=vocab_size)
    model = build_model(preset, vocab_size=len(tokenizer), max_seq_len=max_seq_len, seed=seed, tokenizer=tokenizer)
    return model.eval(), tokenizer


def lora_adapter(model: Any, directory: str | Path, *, seed: int, rank: int = 4) -> Path:
    """Save a LoRA adapter for ``model`` with random (non-identity) weights, so it changes the outputs."""
    import torch
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj", "o_proj"],
                        init_lora_weights=False, lora_dropout=0.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(_clone(model), config)
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.data.normal_(0.0, 0.5)
    peft_model.save_pretrained(str(directory), safe_serialization=True)
    return Path(directory)


def _clone(model: Any) -> Any:
    import copy

    return copy.deepcopy(model)


def make_registry(url: str, *, name: str = "tiny-lm", adapters: int = 2, alias: str = "production",
                  seed: int = 0, preset: str = "tiny") -> dict[str, Any]:
    """Register a tiny model (aliased ``name@alias``) and ``adapters`` LoRA adapters (``name-lora-i``).

    Returns:
        ``{"registry": Registry, "model": "name@v1", "adapters": ["name-lora-0@v1", ...], "tokenizer": tok}``
    """
    from llmstack.models import register_model
    from llmstack.registry import Registry

    registry = Registry(url)
    model, tokenizer = tiny_model(seed=seed, preset=preset)
    ref = register_model(registry, name, model, tokenizer, kind="model", metrics={"note": "random init"})
    registry.set_alias(name, alias, ref)
    refs = []
    for i in range(adapters):
        with tempfile.TemporaryDirectory() as tmp:
            lora_adapter(model, tmp, seed=100 + i)
            refs.append(str(registry.register(f"{name}-lora-{i}", tmp, kind="adapter", parents=[str(ref)])))
    return {"registry": registry, "model": str(ref), "adapters": refs, "tokenizer": tokenizer, "torch_model": model}
