"""llmstack: a Ray-native lifecycle for language models.

    dataset ──train()──▶ model ──finetune_lora()──▶ adapter/merged ──quantize()──▶ int8/nf4
                     every output is a registry version (name@vN) with lineage
                                validate(candidate, baseline) ──▶ deploy()

Every verb has one shape, ``verb(config=None, *, registry=None, overrides=(), **settings)``, and names its
model by one settings key (``llmstack._verbs.MODEL_KEYS``): ``train(model={"source": ...})``,
``finetune_lora(base=...)``, ``quantize(source=...)``, ``validate(candidate=..., baseline=...)``,
``deploy(model=...)``.

``llmstack.train`` (``finetune_lora``, ``quantize``, ``validate``) is always the function, whatever was imported
before: the verb packages are imported here first, so a later ``import llmstack.train.loop`` finds
``llmstack.train`` in ``sys.modules`` and never rebinds the attribute. Reach a verb package's modules with
``from llmstack.train import loop`` (``import llmstack.train.loop as loop`` resolves ``llmstack.train`` as an
attribute, the function, and fails).

The verb packages are light; heavy dependencies (torch, ray, transformers) load on first use, so
``import llmstack`` is fast.
"""

from __future__ import annotations

from llmstack._modules import lazy_exports
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
from llmstack.errors import LLMStackError

# Importing a verb package sets `llmstack.<package>` to the module; the name bound right after replaces it
# with the function, for good: the package is in sys.modules now, so no later import sets it again.
from llmstack.finetune import finetune_lora
from llmstack.quantize import quantize
from llmstack.registry import ArtifactRef, Registry
from llmstack.train import train
from llmstack.validate import validate

__version__ = "0.1.0"

# deploy() lives with Serve, whose package loads fastapi/ray parts on first use.
__getattr__, __dir__ = lazy_exports(__name__, {"llmstack.serve.deployments.builder": ("deploy",)})


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
