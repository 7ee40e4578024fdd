"""Model presets, the one way to describe and load an artifact, and outside models imported into the registry.

Owns: :func:`describe_artifact` (what a registry ref, directory, GGUF file, URL or hub id names, pinned
once), :func:`load_artifact` (the one loader; its result is a :class:`LoadedArtifact`: model, tokenizer and
the artifact), live adapter operations, presets, GGUF import.

May import: ``llmstack.errors`` and ``llmstack.registry``; never a stage package (data, train, finetune,
quantize, validate, serve), which all import this one. Quantized versions load through loaders their
backend registers (:func:`register_quantized_loader`).

May import: ``errors``, ``registry`` (checked by tests/unit/test_import_graph.py).
"""

from llmstack.models.adapters import adapter_context, attach_adapter, check_adapter_base, detach_adapter
from llmstack.models.artifact import (Artifact, LoadedArtifact, describe_artifact, load_artifact,
                                      register_quantized_loader)
from llmstack.models.gguf import import_model
from llmstack.models.loading import load_tokenizer, register_model, save_model
from llmstack.models.presets import PRESETS, build_model, count_parameters, preset_config

__all__ = ["PRESETS", "Artifact", "LoadedArtifact", "adapter_context", "attach_adapter", "build_model",
           "check_adapter_base", "count_parameters", "describe_artifact", "detach_adapter", "import_model",
           "load_artifact", "load_tokenizer", "preset_config", "register_model", "register_quantized_loader",
           "save_model"]
