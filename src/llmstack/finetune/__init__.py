"""Parameter-efficient fine-tuning on the shared Ray Train loop: LoRA, QLoRA, DoRA, BitFit
(biases and norms; norm scales alone on bias-free models), full fine-tuning, distillation and Ray Tune sweeps.

Every function takes a base reference and a config and returns a new registry version with lineage.

May import: ``_verbs``, ``config``, ``data``, ``errors``, ``models``, ``train`` (checked by
tests/unit/test_import_graph.py).

Example:
    >>> from llmstack.finetune import finetune_lora
    >>> from llmstack.models import load_artifact
    >>> result = finetune_lora(base="tiny-lm@v1", lora={"method": "lora"})  # doctest: +SKIP
    >>> loaded = load_artifact(result.ref)  # the base with the adapter attached  # doctest: +SKIP
"""

from llmstack.finetune.adapters import merge_adapter, merged_model
from llmstack.finetune.configs import DistillConfig, SweepConfig
from llmstack.finetune.distill import DistillLoss, DistillResult, distill
from llmstack.finetune.lora import FinetuneResult, finetune_lora
from llmstack.finetune.methods import METHOD_DESCRIPTIONS, check_bitsandbytes
from llmstack.finetune.sweep import SweepResult, sweep

__all__ = [
    "METHOD_DESCRIPTIONS",
    "DistillConfig",
    "DistillLoss",
    "DistillResult",
    "FinetuneResult",
    "SweepConfig",
    "SweepResult",
    "check_bitsandbytes",
    "distill",
    "finetune_lora",
    "merge_adapter",
    "merged_model",
    "sweep",
]
