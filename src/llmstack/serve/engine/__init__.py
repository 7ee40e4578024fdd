"""The inference engine: no HTTP, no Ray.

Rooms: ``protocol`` (what the HTTP layer may ask of any engine), ``transformers`` (the embedded
engine), ``loading`` (what it serves), ``adapters`` (which adapters are loaded and active),
``scheduler`` and ``batch`` (iteration-level batched decoding), ``sampling``, ``output`` (chunks and
results), ``cache`` (the response cache), ``work`` (a request ready to decode).
"""

from __future__ import annotations

from llmstack.serve.engine.cache import ResponseCache
from llmstack.serve.engine.loading import AdapterSpec, LoadedModel, load_served_model, resolve_adapters
from llmstack.serve.engine.protocol import EngineProtocol
from llmstack.serve.engine.transformers import TransformersEngine
from llmstack.serve.engine.work import Work

__all__ = ["AdapterSpec", "EngineProtocol", "LoadedModel", "ResponseCache", "TransformersEngine", "Work",
           "load_served_model", "resolve_adapters"]
