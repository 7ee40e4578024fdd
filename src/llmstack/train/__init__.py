"""Pretraining on Ray Train: ``train(config=None, *, registry=None, overrides=(), **settings) -> TrainResult``.

The per-worker loop lives in :mod:`llmstack.train.loop` (shared with fine-tuning: see
:class:`LoopSpec` and :func:`run_training`); the driver side (cluster, fail-fast checks, progress,
checkpoints in storage, registration) in :mod:`llmstack.train.driver`.

May import: ``_ray``, ``_verbs``, ``config``, ``data``, ``errors``, ``models`` (checked by
tests/unit/test_import_graph.py).
"""

from llmstack.train.driver import RunOutcome, TrainResult, run_training, train
from llmstack.train.loop import LoopSpec, causal_lm_loss, run_worker_loop

__all__ = ["LoopSpec", "RunOutcome", "TrainResult", "causal_lm_loss", "run_training", "run_worker_loop", "train"]
