"""An elastic run (``scaling.num_workers: [min, max]``) on the real local Ray cluster keeps the global batch.

The shared test cluster has 4 CPUs; at 3 CPUs per worker only one worker of ``[1, 2]`` fits, so Ray Train's
elastic policy starts the run on one worker. The loop then accumulates 4 micro-batches instead of the
full-size run's 2 (2 workers x 2 blocks x 2), and the loss curve equals one plain process taking the same
8 blocks per step.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

DATA = {"max_documents": 300, "vocab_size": 512, "block_size": 64}
TRAINING = {"max_steps": 4, "micro_batch_size": 2, "grad_accum_steps": 2, "warmup_steps": 1, "learning_rate": 3e-3,
            "eval_every": 4, "eval_batches": 1, "checkpoint_every": 2, "seed": 0}


def test_elastic_run_starts_on_what_fits_and_keeps_the_global_batch(ray_cluster, tmp_path: Path) -> None:
    from llmstack.config import DataConfig, LoopConfig
    from llmstack.data import prepare_training_data
    from llmstack.train import train
    from llmstack.train.driver import build_preset_model
    from llmstack.train.loop import LocalSession, LoopSpec, run_worker_loop

    result = train({"name": "tiny-elastic", "registry": str(tmp_path / "registry"),
                    "storage_path": str(tmp_path / "runs"), "data": dict(DATA), "training": dict(TRAINING),
                    "scaling": {"num_workers": [1, 2], "cpus_per_worker": 3}}, progress=False)
    assert [r["workers"] for r in result.history] == [1, 1, 1, 1]
    assert [r["grad_accum_steps"] for r in result.history] == [4, 4, 4, 4]

    tokenizer, packed, _ = prepare_training_data(DataConfig(**DATA))
    spec = LoopSpec(model_factory=functools.partial(
        build_preset_model, "tiny", vocab_size=len(tokenizer), max_seq_len=None, seed=0,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    reference = LocalSession()
    settings = {**TRAINING, "micro_batch_size": 8, "grad_accum_steps": 1, "checkpoint_every": 0}
    run_worker_loop(spec, {"input_ids": packed.train}, None, LoopConfig(**settings), session=reference)
    assert [r["loss"] for r in result.history] == pytest.approx(
        [r["loss"] for r in reference.records if "loss" in r], rel=2e-5, abs=2e-5)
