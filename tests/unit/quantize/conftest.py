"""A tiny LLaMA trained for a few dozen steps in-process, registered once per session.

Training makes perplexity meaningful (a random model sits at ~vocab size) without Ray.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

DATA = {"source": "builtin:stdlib", "max_documents": 60, "block_size": 64, "eval_fraction": 0.1, "seed": 0}
# Small evaluation/speed settings keep each quantize() call to a second or two.
FAST = {"evaluation": {"samples": 4, "speed_prompt_tokens": 16, "speed_new_tokens": 4, "speed_repeats": 1},
        "calibration": {"samples": 8}}
NO_EVALUATION = {"evaluation": {"enabled": False}}  # quantize and register only


def _train(steps: int = 60) -> tuple[Any, Any]:
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # see _one_thread; session fixtures run before function-scoped ones
    try:
        return _train_steps(steps)
    finally:
        torch.set_num_threads(previous)


def _train_steps(steps: int) -> tuple[Any, Any]:
    import torch

    from llmstack.data import load_corpus, pack_corpus, train_tokenizer
    from llmstack.models import build_model

    corpus = load_corpus(DATA["source"], max_documents=DATA["max_documents"])
    tokenizer = train_tokenizer(corpus.documents, vocab_size=512)
    packed = pack_corpus(corpus, tokenizer, block_size=DATA["block_size"], eval_fraction=DATA["eval_fraction"],
                         seed=DATA["seed"])
    model = build_model("tiny", vocab_size=len(tokenizer), tokenizer=tokenizer, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        batch = packed.train[torch.randint(0, packed.train.shape[0], (16,), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return model, tokenizer


@pytest.fixture(scope="session")
def trained_tiny() -> tuple[Any, Any]:
    return _train()


@pytest.fixture(scope="session")
def quant_registry(tmp_path_factory: pytest.TempPathFactory, trained_tiny: tuple[Any, Any]) -> Any:
    """A registry holding ``tiny@v1``, the trained model, with its training data in the manifest."""
    from llmstack.models import register_model
    from llmstack.registry import Registry

    registry = Registry(str(tmp_path_factory.mktemp("quant-registry") / "registry"))
    model, tokenizer = trained_tiny
    register_model(registry, "tiny", model, tokenizer, kind="model", config={"data": DATA})
    return registry


@pytest.fixture(scope="session")
def source_dir(quant_registry: Any) -> Path:
    return quant_registry.fetch("tiny@v1")


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    """One intra-op thread: on a shared 2-core box OpenMP spin-waiting makes 2 threads ~10x slower."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def held_out(trained_tiny: tuple[Any, Any]) -> Any:
    """The held-out blocks quantize() evaluates ``tiny@v1`` on: its training run's eval split."""
    from llmstack.data import load_corpus, pack_corpus

    _, tokenizer = trained_tiny
    corpus = load_corpus(DATA["source"], max_documents=DATA["max_documents"])
    packed = pack_corpus(corpus, tokenizer, block_size=DATA["block_size"], eval_fraction=DATA["eval_fraction"],
                         seed=DATA["seed"])
    return packed.eval[: FAST["evaluation"]["samples"]]
