"""Serving: an OpenAI-compatible Ray Serve app with dynamic batching, autoscaling and multi-LoRA.

Rooms, each importable on its own: ``engine/`` (inference, no HTTP, no Ray), ``protocol`` (request and
response models), ``http/`` (the OpenAI FastAPI app), ``deployments/`` (the Serve deployments and the
app builder), ``routing/`` (the routing layer: region and canary policies in one ingress), ``canary/``
(progressive releases) and ``regions/`` (multi-region serving), both configurations of ``routing/``.

May import: ``_console``, ``_modules``, ``_ray``, ``_verbs``, ``autoscale``, ``config``, ``data``, ``errors``,
``models``, ``registry`` (checked by tests/unit/test_import_graph.py).

Example:
    >>> import llmstack
    >>> with llmstack.deploy({"model": "tiny-lm@production", "http": {"port": 8123}}) as dep:  # doctest: +SKIP
    ...     print(dep.url)
"""

from __future__ import annotations

from llmstack._modules import lazy_exports

# Public names, loaded on first use so that `import llmstack` stays fast (no ray/torch/fastapi here).
_LAZY = {
    "llmstack.serve.deployments.builder": ("build_app", "deploy", "Deployment", "resolve_config"),
    "llmstack.serve.engine": ("Engine", "EngineProtocol", "TransformersEngine"),
    "llmstack.serve.http": ("make_api",),
    "llmstack.serve.deployments.client": ("ServeEngineClient",),
    "llmstack.serve.deployments.ingress": ("OpenAIIngress",),
    "llmstack.serve.deployments.server": ("LLMServer",),
    "llmstack.serve.protocol": ("EngineError", "GenerationRequest", "GenerationResult", "SamplingParams"),
}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)

__all__ = sorted(name for names in _LAZY.values() for name in names)
