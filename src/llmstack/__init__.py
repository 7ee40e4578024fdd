"""llmstack: a Ray-native lifecycle for language models.

    dataset ──train()──▶ model ──finetune_lora()──▶ adapter/merged ──quantize()──▶ int8/nf4
                     every output is a registry version (name@vN) with lineage
                                validate(candidate, baseline) ──▶ deploy()

Heavy dependencies (torch, ray, transformers) load on first use, so ``import llmstack`` is fast.
"""

from __future__ import annotations

from llmstack.config import (
    DataConfig,
    FinetuneConfig,
    FinetuneMethodConfig,
    LoopConfig,
    ModelConfig,
    QuantizeConfig,
    ReplicaAutoscalingConfig,
    ServeConfig,
    TrainConfig,
    WorkersConfig,
    load_config,
)
from llmstack._modules import lazy_exports
from llmstack.errors import LLMStackError

__version__ = "0.1.0"

# Public names served lazily: defining module -> its names.
_LAZY = {
    "llmstack.train": ("train",),
    "llmstack.finetune": ("finetune_lora",),
    "llmstack.quantize": ("quantize",),
    "llmstack.validate": ("validate",),
    "llmstack.serve": ("deploy",),
    "llmstack.registry": ("Registry", "ArtifactRef"),
}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)


__all__ = [
    "ArtifactRef",
    "DataConfig",
    "FinetuneConfig",
    "FinetuneMethodConfig",
    "LLMStackError",
    "LoopConfig",
    "ModelConfig",
    "QuantizeConfig",
    "Registry",
    "ReplicaAutoscalingConfig",
    "ServeConfig",
    "TrainConfig",
    "WorkersConfig",
    "deploy",
    "finetune_lora",
    "load_config",
    "quantize",
    "train",
    "validate",
]
