"""Config dataclasses of distillation and sweeps (fine-tuning's own lives in :mod:`llmstack.config`).

They parse like every llmstack config: ``load_config(DistillConfig, "distill.yaml", ["alpha=0.7"])``
collects unknown keys, wrong types and out-of-range values together, each with its key path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from llmstack.config import (FinetuneConfig, InstructionDataConfig, LoopConfig, TrackingConfig, WorkersConfig,
                             _at_least)

Problems = list[tuple[str, str]]


@dataclass
class DistillConfig:
    name: str = "tiny-lm-distilled"  # registry name of the student
    teacher: str | None = None  # registry ref, local HF directory or hub id of the teacher
    student: str = "preset:tiny"  # "preset:<name>" (fresh, teacher's tokenizer) or a model ref/dir/hub id
    temperature: float = 2.0  # softens both distributions; the soft loss is scaled by T^2
    alpha: float = 0.5  # weight of the soft (teacher KL) loss; 1 - alpha on the hard labels
    registry: str | None = None  # registry URL
    storage_path: str | None = None  # checkpoint storage
    storage_options: dict[str, Any] = field(default_factory=dict)  # fsspec options of storage_path
    packing: bool = False  # pack several instruction examples per row
    data: InstructionDataConfig = field(
        default_factory=lambda: InstructionDataConfig(source="builtin:stdlib-qa", block_size=128))
    training: LoopConfig = field(
        default_factory=lambda: LoopConfig(max_steps=100, learning_rate=2e-3, warmup_steps=10))
    scaling: WorkersConfig = field(default_factory=WorkersConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # MLflow, as for train and finetune

    def check(self) -> Problems:
        problems: Problems = []
        if not self.temperature > 0:
            problems.append(("temperature", f"must be > 0, got {self.temperature}"))
        if not 0.0 <= self.alpha <= 1.0:
            problems.append(("alpha", f"must be in [0, 1], got {self.alpha}"))
        if not self.student:
            problems.append(("student", "must be preset:<name> or a model ref/directory/hub id"))
        return problems


@dataclass
class SweepConfig:
    name: str = "tiny-lm-sweep"  # registry name of the best adapter; trials run as <name>-t<i>
    base: str | None = None  # base model (overrides finetune.base)
    registry: str | None = None  # registry URL
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)  # the template every trial starts from
    # MLflow: finetune.tracking (one parent run for the sweep, a nested child run per trial)
    learning_rates: list[float] = field(default_factory=lambda: [3e-4, 1e-3, 3e-3])  # values searched
    ranks: list[int] = field(default_factory=lambda: [4, 8, 16])  # LoRA ranks searched
    alphas: list[float] = field(default_factory=lambda: [8.0, 16.0, 32.0])  # LoRA alphas searched
    search: Literal["grid", "random"] = "random"  # grid: every combination; random: num_samples draws
    num_samples: int = 4  # random search draws (grid runs every combination once)
    metric: str = "eval_loss"  # minimised
    grace_period: int = 1  # ASHA: reports (eval steps) before a trial may be stopped
    reduction_factor: int = 2  # ASHA: keep 1/reduction_factor of trials per rung
    max_concurrent_trials: int = 1  # trials at once (each is a Ray Train run of finetune.scaling workers)
    seed: int = 0  # random search seed

    def check(self) -> Problems:
        problems: Problems = []
        for key, values in (("learning_rates", self.learning_rates), ("ranks", self.ranks), ("alphas", self.alphas)):
            if not values:
                problems.append((key, "must list at least one value"))
            elif any(not v > 0 for v in values):
                problems.append((key, f"every value must be > 0, got {values}"))
        _at_least(problems, self, "num_samples", 1)
        _at_least(problems, self, "grace_period", 1)
        _at_least(problems, self, "reduction_factor", 2)
        _at_least(problems, self, "max_concurrent_trials", 1)
        if self.metric not in ("eval_loss", "loss"):
            problems.append(("metric", f"must be eval_loss or loss, got {self.metric!r}"))
        return problems


__all__ = ["DistillConfig", "SweepConfig"]
