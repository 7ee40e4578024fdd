"""Shared tiny models for the gate tests (trained once per session, one thread, fixed seeds)."""

from __future__ import annotations

import copy
import sys
import time
import types
from collections.abc import Iterator
from typing import Any

import pytest

@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Latency and training on a shared 2-core machine: one intra-op thread avoids oversubscription.

    Module-scoped so the setting never leaks into other areas' tests in the same session.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def corpus_docs() -> list[str]:
    from llmstack.data import load_corpus

    return load_corpus("builtin:stdlib", max_documents=120).documents


@pytest.fixture(scope="session")
def tokenizer(corpus_docs: list[str]) -> Any:
    from llmstack.data import load_corpus, trained_tokenizer

    return trained_tokenizer(load_corpus("builtin:stdlib", max_documents=120), vocab_size=512)


@pytest.fixture(scope="session")
def held_out_texts(corpus_docs: list[str]) -> list[str]:
    """Documents neither model trained on."""
    return corpus_docs[100:]


@pytest.fixture(scope="session")
def held_out(held_out_texts: list[str], tokenizer: Any) -> Any:
    """The held-out documents packed once into ``LongTensor [16, 64]`` blocks."""
    import torch

    stream: list[int] = []
    for text in held_out_texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return torch.tensor(stream[: 16 * 64]).view(16, 64)


@pytest.fixture(scope="session")
def model_a(tokenizer: Any, corpus_docs: list[str]) -> Any:
    """The baseline: 30 steps on stdlib docstrings."""
    return train_tiny(tokenizer, corpus_docs[:100], steps=30, seed=0)


@pytest.fixture(scope="session")
def model_b(tokenizer: Any) -> Any:
    """Same architecture and tokenizer, 30 steps on different text (stdlib Q&A pairs)."""
    from llmstack.data import load_corpus

    return train_tiny(tokenizer, load_corpus("builtin:stdlib-qa", max_documents=400).documents, steps=30, seed=1)


@pytest.fixture(scope="session")
def helpers() -> types.ModuleType:
    """train_tiny, fake_int8, noised, with_nan, slowed (defined below in this conftest)."""
    return sys.modules[__name__]

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


def slowed(model: Any, *, factor: float = 2.0) -> Any:
    """A copy whose every forward pass then sleeps ``factor`` x its own duration: (1 + factor) x slower.

    Relative rather than fixed, so the slowdown stays clear of scheduling noise however busy the
    machine is (a fixed sleep drowns when every forward pass is stretched by load).
    """
    slow = copy.deepcopy(model)
    started: list[float] = []
    slow.register_forward_pre_hook(lambda *_: started.append(time.perf_counter()))
    slow.register_forward_hook(lambda *_: time.sleep(factor * (time.perf_counter() - started.pop())))
    return slow
