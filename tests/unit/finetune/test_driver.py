"""finetune_lora()'s driver up to the hand-off to Ray Train (stubbed): what it reads and how often."""

from __future__ import annotations

from typing import Any

import pytest


class _HandedOff(Exception):
    """Raised by the stubbed run_training: the driver got as far as starting workers."""


@pytest.mark.parametrize("method", ["lora", "full"])
def test_the_driver_reads_the_base_once_before_training(base: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Any, method: str) -> None:
    import importlib

    from llmstack.finetune.lora import finetune_lora
    from llmstack.models import artifact

    reads: list[str] = []
    original = artifact._from_pretrained

    def counting(found: Any, dtype: str) -> Any:
        reads.append(f"{found.label}:{dtype}")
        return original(found, dtype)

    handed: dict[str, Any] = {}

    def run_training(spec: Any, train: Any, evaluation: Any, **kwargs: Any) -> Any:
        handed["factory"] = spec.model_factory
        raise _HandedOff

    monkeypatch.setattr(artifact, "_from_pretrained", counting)
    # the package, where finetune_lora imports run_training from (`llmstack.train` is the train() function)
    monkeypatch.setattr(importlib.import_module("llmstack.train"), "run_training", run_training)
    config = {"lora": {"method": method, "rank": 4}, "scaling": {"num_workers": 1},
              "training": {"max_steps": 1, "micro_batch_size": 4, "eval_batches": 1},
              "data": {"source": "builtin:stdlib-qa", "block_size": 64, "max_documents": 24}, "storage_path": str(tmp_path / "runs")}
    with pytest.raises(_HandedOff):
        finetune_lora(config, base=str(base["ref"]), registry=base["registry"], progress=False)
    # one read for the checks, the target modules and the held-out loss before training; full fine-tuning
    # reads it as float32 master weights
    assert reads == [f"{base['ref']}:float32"]
    assert handed["factory"].target_modules == (None if method == "full" else
                                                ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj",
                                                 "v_proj"])
