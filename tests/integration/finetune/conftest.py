"""A tiny registered base for the fine-tuning integration tests (real local Ray)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest

QA = "builtin:stdlib-qa"


@pytest.fixture(scope="module")
def ft_base(tmp_path_factory: pytest.TempPathFactory, ray_cluster: dict) -> dict[str, Any]:
    from llmstack.data import load_corpus, trained_tokenizer
    from llmstack.models import build_model, register_model
    from llmstack.registry import Registry

    warnings.filterwarnings("ignore", category=FutureWarning)
    root = Path(tmp_path_factory.mktemp("ft-ray"))
    registry = Registry(str(root / "registry"))
    corpus = load_corpus("builtin:stdlib", max_documents=60)
    tokenizer = trained_tokenizer(corpus, vocab_size=512)
    model = build_model("tiny", vocab_size=len(tokenizer), tokenizer=tokenizer, max_seq_len=128, seed=0)
    ref = register_model(registry, "base", model, tokenizer, kind="model")
    return {"registry": registry, "ref": ref, "tokenizer": tokenizer, "root": root}


def small_config(name: str, root: Path, *, workers: int = 1, strategy: str = "ddp", steps: int = 4,
                 **lora: Any) -> dict[str, Any]:
    """A few optimizer steps on 64 QA rows: enough to see the held-out answer loss move."""
    return {"name": name, "storage_path": str(root / "runs"),
            "data": {"block_size": 64, "max_documents": 64},
            "lora": {"rank": 4, "alpha": 8.0, "dropout": 0.0, **lora},
            "training": {"max_steps": steps, "micro_batch_size": 4, "learning_rate": 3e-3, "warmup_steps": 0,
                         "eval_every": steps, "eval_batches": 2, "checkpoint_every": 0},
            "scaling": {"num_workers": workers, "strategy": strategy}}


@pytest.fixture(name="small_config")
def small_config_fixture() -> Any:
    return small_config
