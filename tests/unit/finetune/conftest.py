"""A tiny registered base model shared by the fine-tuning unit tests (built once per module)."""

from __future__ import annotations

import warnings
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


def run_local(base: dict[str, Any], method: str, root: Path, *, steps: int = 6, lr: float = 3e-3,
              rank: int = 4) -> dict[str, Any]:
    from llmstack.config import LoRAConfig, TrainingConfig
    from llmstack.finetune.lora import evaluate_in_process
    from llmstack.finetune.methods import ModelFactory
    from llmstack.train.loop import LocalSession, LoopSpec, run_worker_loop

    lora = LoRAConfig(method=method, rank=rank, alpha=2.0 * rank, dropout=0.0)
    factory = ModelFactory(base["registry"], str(base["ref"]), method, lora, seed=0)
    training = TrainingConfig(max_steps=steps, micro_batch_size=8, learning_rate=lr, warmup_steps=0,
                              eval_every=steps, eval_batches=2, checkpoint_every=0, weight_decay=0.0)
    before = evaluate_in_process(factory, base["data"].eval, training)
    session = LocalSession(root / method)
    spec = LoopSpec(model_factory=factory, checkpoint_trainable_only=method != "full")
    run_worker_loop(spec, base["data"].train, base["data"].eval, training, session=session)
    return {"factory": factory, "session": session, "before": before, "after": session.reports[-1]["eval_loss"],
            "checkpoint": root / method / f"checkpoint_{steps:06d}"}


def register(base: dict[str, Any], run: dict[str, Any], name: str) -> Any:
    from llmstack.config import FinetuneConfig
    from llmstack.finetune.lora import _register_adapter, load_trainable
    from llmstack.finetune.methods import resolve_target_modules
    from llmstack.models import load_model

    factory = run["factory"]
    cfg = FinetuneConfig(name=name, base=str(base["ref"]))
    cfg.lora = factory.lora
    model, _ = load_model(str(base["ref"]), registry=base["registry"])
    targets = resolve_target_modules(model, None) if factory.method != "bitfit" else None
    return _register_adapter(base["registry"], cfg, factory, load_trainable(run["checkpoint"]), base["ref"],
                             model.config, targets, {"eval_loss": run["after"]}, base["data"].fingerprint,
                             {"method": factory.method})


@pytest.fixture
def helpers() -> Any:
    from types import SimpleNamespace

    return SimpleNamespace(run_local=run_local, register=register)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from llmstack.finetune.data import instruction_tensors
    from llmstack.registry import Registry

    warnings.filterwarnings("ignore", category=FutureWarning)
    root = tmp_path_factory.mktemp("ft-unit")
    registry = Registry(str(root / "registry"))
    ref, tokenizer = make_base(registry)
    data = instruction_tensors(QA, tokenizer, max_length=BLOCK, max_rows=96)
    return {"registry": registry, "ref": ref, "tokenizer": tokenizer, "data": data, "root": Path(root)}
