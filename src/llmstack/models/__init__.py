"""Model presets and loading (registry ref, local HF directory or hub id)."""

from llmstack.models.loading import load_model, load_tokenizer, register_model, resolve_model_source, save_model
from llmstack.models.presets import PRESETS, build_model, count_parameters, preset_config

__all__ = ["PRESETS", "build_model", "count_parameters", "load_model", "load_tokenizer", "preset_config",
           "register_model", "resolve_model_source", "save_model"]
