"""Pretraining on Ray Train: ``train(config) -> TrainResult``.

The per-worker loop lives in :mod:`llmstack.train.loop` (shared with fine-tuning: see
:class:`LoopSpec` and :func:`run_training`); the driver side (cluster, fail-fast checks, progress,
checkpoints in storage, registration) in :mod:`llmstack.train.driver`.
"""

import sys
import types
from typing import Any

from llmstack.train.driver import RunOutcome, TrainResult, run_training, train
from llmstack.train.loop import LoopSpec, causal_lm_loss, run_worker_loop


class _CallableModule(types.ModuleType):
    """``llmstack.train`` is both this package and the public function: once the package is
    imported, Python binds ``llmstack.train`` to the module, so the module forwards calls."""

    def __call__(self, *args: Any, **kwargs: Any) -> TrainResult:
        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

__all__ = ["LoopSpec", "RunOutcome", "TrainResult", "causal_lm_loss", "run_training", "run_worker_loop", "train"]
