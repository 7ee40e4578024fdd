"""Serving: an OpenAI-compatible Ray Serve app with dynamic batching, autoscaling and multi-LoRA.

Layers, each importable on its own: ``engine`` (no HTTP, no Ray), ``protocol`` (request/response
models), ``server`` (the model deployment), ``ingress`` (the HTTP layer), ``app`` (assembly).

Example:
    >>> import llmstack
    >>> with llmstack.deploy({"model": "tiny-lm@production", "port": 8123}) as dep:  # doctest: +SKIP
    ...     print(dep.url)
"""

from __future__ import annotations

import importlib
from typing import Any

# Public names, loaded on first use so that `import llmstack` stays fast (no ray/torch/fastapi here).
_LAZY = {
    "build_app": "llmstack.serve.app",
    "deploy": "llmstack.serve.app",
    "Deployment": "llmstack.serve.app",
    "resolve_config": "llmstack.serve.app",
    "EngineProtocol": "llmstack.serve.engine",
    "TransformersEngine": "llmstack.serve.engine",
    "load_served_model": "llmstack.serve.engine",
    "make_api": "llmstack.serve.ingress",
    "ServeEngineClient": "llmstack.serve.ingress",
    "OpenAIIngress": "llmstack.serve.ingress",
    "LLMServer": "llmstack.serve.server",
    "EngineError": "llmstack.serve.protocol",
    "GenerationRequest": "llmstack.serve.protocol",
    "GenerationResult": "llmstack.serve.protocol",
    "SamplingParams": "llmstack.serve.protocol",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'llmstack.serve' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = sorted(_LAZY)
