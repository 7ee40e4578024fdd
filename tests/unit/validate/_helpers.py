"""Tiny models for the gate tests: trained in-process for a few dozen steps on different text."""

from __future__ import annotations

import copy
import time
from typing import Any


def train_tiny(tokenizer: Any, texts: list[str], *, steps: int = 40, seed: int = 0, block: int = 64,
               batch: int = 8, lr: float = 3e-3) -> Any:
    """A tiny llama trained ``steps`` AdamW steps on ``texts`` (deterministic for a seed)."""
    import torch

    from llmstack.models import build_model

    torch.manual_seed(seed)
    stream: list[int] = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    n = len(stream) // block
    data = torch.tensor(stream[: n * block]).view(n, block)  # [n, block]
    model = build_model("tiny", vocab_size=len(tokenizer), max_seq_len=256, seed=seed, tokenizer=tokenizer)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, n, (batch,), generator=gen)
        loss = model(input_ids=data[idx], labels=data[idx]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model


def fake_int8(model: Any) -> Any:
    """A copy with every Linear weight rounded to symmetric per-output-channel int8 (what int8 PTQ stores)."""
    import torch

    quant = copy.deepcopy(model)
    with torch.no_grad():
        for module in quant.modules():
            if isinstance(module, torch.nn.Linear):
                w = module.weight  # [out, in]
                scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-8) / 127.0
                w.copy_((w / scale).round().clamp(-127, 127) * scale)
    return quant


def noised(model: Any, *, scale: float = 1.0, seed: int = 0) -> Any:
    """A copy with Gaussian noise of ``scale`` x each tensor's std added to every weight."""
    import torch

    bad = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in bad.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * p.std().clamp_min(1e-3) * scale)
    return bad


def with_nan(model: Any) -> Any:
    """A copy whose first MLP weight holds a NaN (a corrupted checkpoint)."""
    import torch

    bad = copy.deepcopy(model)
    with torch.no_grad():
        bad.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    return bad


def slowed(model: Any, *, seconds: float = 0.01) -> Any:
    """A copy whose every forward pass sleeps ``seconds`` (a deliberately slow deployment)."""
    slow = copy.deepcopy(model)
    slow.register_forward_hook(lambda *_: time.sleep(seconds))
    return slow
