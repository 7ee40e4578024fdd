"""Method -> backend dispatch, peft style: an ordered chain, first match wins, backends imported lazily."""

from __future__ import annotations

import importlib
from typing import Any

from llmstack.config import QUANTIZE_METHODS
from llmstack.errors import ConfigError

# (methods, module holding BACKEND); order matters only if two backends claim a method.
_CHAIN: tuple[tuple[tuple[str, ...], str], ...] = (
    (("int8", "nf4", "fp4"), "llmstack.quantize.bnb"),
    (("smoothquant", "w8a8"), "llmstack.quantize.smoothquant"),
    (("int8-weight-only", "int8-dynamic", "int4-weight-only", "dynamic-int8"), "llmstack.quantize.torchao_backend"),
)


def known_methods() -> tuple[str, ...]:
    """Every method a backend handles, in dispatch order."""
    return tuple(m for methods, _ in _CHAIN for m in methods)


def get_backend(method: str) -> Any:
    """The backend object for ``method``; :class:`ConfigError` listing the known methods otherwise."""
    for methods, module in _CHAIN:
        if method in methods:
            return importlib.import_module(module).BACKEND
    raise ConfigError(f"method: unknown quantization method {method!r}; known: {', '.join(known_methods())}")


assert set(known_methods()) == set(QUANTIZE_METHODS), "config.QUANTIZE_METHODS out of sync with the dispatcher"
