"""Model presets, one way to describe and load an artifact (registry ref, directory, GGUF file, URL or hub id),
and outside models imported into the registry."""

from llmstack.models.adapters import adapter_context, attach_adapter, check_adapter_base, detach_adapter
from llmstack.models.artifact import Artifact, LoadedArtifact, describe_artifact, load_artifact
from llmstack.models.gguf import import_model
from llmstack.models.loading import load_model, load_tokenizer, register_model, resolve_model_source, save_model
from llmstack.models.presets import PRESETS, build_model, count_parameters, preset_config

__all__ = ["PRESETS", "Artifact", "LoadedArtifact", "adapter_context", "attach_adapter", "build_model",
           "check_adapter_base", "count_parameters", "describe_artifact", "detach_adapter", "import_model",
           "load_artifact", "load_model", "load_tokenizer", "preset_config", "register_model", "resolve_model_source",
           "save_model"]
