"""The inference engine: no HTTP, no Ray.

Rooms: ``protocol`` (what the HTTP layer may ask of any engine), ``transformers`` (the embedded
engine), ``loading`` (what it serves), ``adapters`` (which adapters are loaded and active),
``scheduler`` and ``batch`` (iteration-level batched decoding), ``kv`` (the decode KV cache, grown in
place), ``prefix_cache`` (KV states of prompt blocks reused across requests), ``sampling``, ``output``
(chunks, results, incremental detokenization), ``cache`` (the response cache), ``work`` (a request
ready to decode).
"""

from __future__ import annotations

from llmstack.serve.engine.cache import ResponseCache
from llmstack.serve.engine.loading import AdapterSpec, LoadedModel, load_served_model, resolve_adapters
from llmstack.serve.engine.protocol import EngineProtocol
from llmstack.serve.engine.transformers import TransformersEngine
from llmstack.serve.engine.work import Work

__all__ = ["AdapterSpec", "EngineProtocol", "LoadedModel", "ResponseCache", "TransformersEngine", "Work",
           "load_served_model", "resolve_adapters"]
