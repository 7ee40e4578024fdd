"""A tiny registered base model and in-process training runs shared by the fine-tuning unit tests."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

QA = "builtin:stdlib-qa"
BLOCK = 64


def make_base(registry: Any, name: str = "base", *, seed: int = 0) -> tuple[Any, Any]:
    """Register a seeded tiny LLaMA with a small BPE tokenizer; return ``(ref, tokenizer)``."""
    from llmstack.data import load_corpus, trained_tokenizer
    from llmstack.models import build_model, register_model

    corpus = load_corpus("builtin:stdlib", max_documents=60)
    tokenizer = trained_tokenizer(corpus, vocab_size=512)
    model = build_model("tiny", vocab_size=len(tokenizer), tokenizer=tokenizer, max_seq_len=128, seed=seed)
    return register_model(registry, name, model, tokenizer, kind="model"), tokenizer


def run_local(base: dict[str, Any], method: str, root: Path, *, steps: int = 4, lr: float = 3e-3,
              rank: int = 4) -> dict[str, Any]:
    """Train ``method`` through the shared loop in this process (no Ray); final checkpoint under ``root``."""
    from llmstack.config import FinetuneMethodConfig, LoopConfig
    from llmstack.finetune.lora import evaluate_in_process
    from llmstack.finetune.methods import ModelFactory
    from llmstack.train.loop import LocalSession, LoopSpec, run_worker_loop

    lora = FinetuneMethodConfig(method=method, rank=rank, alpha=2.0 * rank, dropout=0.0)
    factory = ModelFactory(base["registry"], str(base["ref"]), method, lora, seed=0)
    training = LoopConfig(max_steps=steps, micro_batch_size=8, learning_rate=lr, warmup_steps=0,
                              eval_every=steps, eval_batches=2, checkpoint_every=0, weight_decay=0.0)
    before = evaluate_in_process(factory, base["data"].eval, training)
    session = LocalSession(root / method)
    spec = LoopSpec(model_factory=factory, checkpoint_trainable_only=method != "full")
    run_worker_loop(spec, base["data"].train, base["data"].eval, training, session=session)
    return {"factory": factory, "session": session, "before": before, "after": session.reports[-1]["eval_loss"],
            "checkpoint": root / method / f"checkpoint_{steps:06d}"}


def register(base: dict[str, Any], run: dict[str, Any], name: str) -> Any:
    """Register a local run's final checkpoint as an adapter, the way finetune_lora() does."""
    from llmstack.config import FinetuneConfig
    from llmstack.finetune.lora import _register_adapter, load_trainable
    from llmstack.finetune.methods import resolve_target_modules
    from llmstack.models import load_artifact

    factory = run["factory"]
    cfg = FinetuneConfig(name=name, base=str(base["ref"]))
    cfg.lora = factory.lora
    model = load_artifact(str(base["ref"]), registry=base["registry"]).model
    targets = resolve_target_modules(model, None) if factory.method != "bitfit" else None
    return _register_adapter(base["registry"], cfg, factory, load_trainable(run["checkpoint"]), base["ref"],
                             model.config, targets, {"eval_loss": run["after"]}, base["data"].fingerprint,
                             {"method": factory.method})


@pytest.fixture(scope="session")
def base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    import torch

    from llmstack.finetune.data import instruction_tensors
    from llmstack.registry import Registry

    warnings.filterwarnings("ignore", category=FutureWarning)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster than two contended ones
    root = tmp_path_factory.mktemp("ft-unit")
    registry = Registry(str(root / "registry"))
    ref, tokenizer = make_base(registry)
    data = instruction_tensors(QA, tokenizer, max_length=BLOCK, max_rows=64)
    yield {"registry": registry, "ref": ref, "tokenizer": tokenizer, "data": data, "root": Path(root)}
    torch.set_num_threads(threads)


@pytest.fixture(name="make_base")
def make_base_fixture() -> Callable[..., tuple[Any, Any]]:
    return make_base


@pytest.fixture(scope="session")
def trained(base: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], dict[str, Any]]:
    """``trained(method)``: the in-process run of ``method`` (each method trained once per session)."""
    cache: dict[str, dict[str, Any]] = {}
    root = tmp_path_factory.mktemp("ft-runs")

    def get(method: str) -> dict[str, Any]:
        if method not in cache:
            cache[method] = run_local(base, method, root, lr=1e-2 if method == "bitfit" else 3e-3)
        return cache[method]

    return get


@pytest.fixture(scope="session")
def adapters(base: dict[str, Any], trained: Callable[[str], dict[str, Any]]) -> Callable[[str], Any]:
    """``adapters(method)``: that run registered as adapter ``ad-<method>``."""
    cache: dict[str, Any] = {}

    def get(method: str) -> Any:
        if method not in cache:
            cache[method] = register(base, trained(method), f"ad-{method}")
        return cache[method]

    return get
