"""The one KV-cache compatibility shim: transformers renamed ``past_key_values`` to ``cache`` (5.2x)."""

from __future__ import annotations

import inspect
from typing import Any


def cache_kwarg(model: Any) -> str:
    """The forward keyword that takes a KV cache: ``cache`` where the model accepts it, else ``past_key_values``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"


def output_cache(out: Any) -> Any:
    """The KV cache a forward pass returned (``cache`` on new transformers, ``past_key_values`` before)."""
    cache = out["cache"] if "cache" in out.keys() else None
    return cache if cache is not None else out.past_key_values
