"""Serving: an OpenAI-compatible Ray Serve app with dynamic batching, autoscaling and multi-LoRA.

Rooms, each importable on its own: ``engine/`` (inference, no HTTP, no Ray), ``protocol`` (request and
response models), ``http/`` (the OpenAI FastAPI app), ``deployments/`` (the Serve deployments and the
app builder), ``canary/`` (progressive releases behind a router).

Example:
    >>> import llmstack
    >>> with llmstack.deploy({"model": "tiny-lm@production", "port": 8123}) as dep:  # doctest: +SKIP
    ...     print(dep.url)
"""

from __future__ import annotations

from llmstack._modules import lazy_exports

# Public names, loaded on first use so that `import llmstack` stays fast (no ray/torch/fastapi here).
_LAZY = {
    "build_app": "llmstack.serve.deployments.builder",
    "deploy": "llmstack.serve.deployments.builder",
    "Deployment": "llmstack.serve.deployments.builder",
    "resolve_config": "llmstack.serve.deployments.builder",
    "EngineProtocol": "llmstack.serve.engine",
    "TransformersEngine": "llmstack.serve.engine",
    "load_served_model": "llmstack.serve.engine",
    "make_api": "llmstack.serve.http",
    "ServeEngineClient": "llmstack.serve.deployments.client",
    "OpenAIIngress": "llmstack.serve.deployments.ingress",
    "LLMServer": "llmstack.serve.deployments.server",
    "EngineError": "llmstack.serve.protocol",
    "GenerationRequest": "llmstack.serve.protocol",
    "GenerationResult": "llmstack.serve.protocol",
    "SamplingParams": "llmstack.serve.protocol",
}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)

__all__ = sorted(_LAZY)
