"""Continued pretraining of an outside Hugging Face checkpoint on Ray Train: a tiny GPT-2 directory (Conv1D,
learned positions, its own tokenizer) trained for 2 steps on 1 worker and registered."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.ray


def _gpt2_directory(root: Path) -> Path:
    from llmstack.data import load_corpus, trained_tokenizer
    from llmstack.serve._testing import tiny_causal_lm

    tokenizer = trained_tokenizer(load_corpus("builtin:stdlib", max_documents=60), vocab_size=512)
    directory = root / "gpt2-tiny"
    tiny_causal_lm("gpt2", tokenizer, max_positions=64).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_gpt2_directory_continues_pretraining_and_is_registered(ray_cluster, tmp_path: Path) -> None:
    import torch
    from transformers import AutoTokenizer

    from llmstack.models import load_artifact
    from llmstack.registry import Registry
    from llmstack.train import train

    source = _gpt2_directory(tmp_path)
    config = {"name": "gpt2-cpt", "registry": str(tmp_path / "registry"), "storage_path": str(tmp_path / "runs"),
              "model": {"source": str(source)},
              "data": {"source": "builtin:stdlib", "max_documents": 80, "block_size": 64},
              "training": {"max_steps": 2, "micro_batch_size": 2, "warmup_steps": 0, "learning_rate": 1e-3,
                           "eval_every": 2, "eval_batches": 1, "checkpoint_every": 2},
              "scaling": {"num_workers": 1, "cpus_per_worker": 1}}
    result = train(config, progress=False)
    assert [r["step"] for r in result.history] == [1, 2]
    registry = Registry(str(tmp_path / "registry"))
    manifest = registry.manifest(result.ref)
    assert manifest.kind == "model" and str(result.tokenizer_ref) in manifest.parents
    loaded = load_artifact(str(result.ref), registry=registry)
    trained, tokenizer = loaded.model, loaded.tokenizer
    original = load_artifact(str(source), with_tokenizer=False).model
    assert type(trained).__name__ == "GPT2LMHeadModel" and trained.config.n_positions == 64
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(str(source)).get_vocab()  # the model's own
    start, end = original.state_dict(), trained.state_dict()
    assert set(start) == set(end)
    assert any(not torch.equal(start[k], end[k]) for k in start)  # trained from those weights
    assert all(torch.isfinite(v).all() for v in end.values())
