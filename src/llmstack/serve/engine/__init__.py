"""The inference engine: no HTTP, no Ray.

Rooms: ``base`` (the :class:`Engine` ABC: everything a replica calls of an engine), ``protocol`` (what the
HTTP layer may ask of any engine or a handle to one), ``preparation`` (model ids, validation, chat template,
tokenization, response cache: shared by every engine), ``transformers`` (the embedded engine), ``vllm``
(vLLM's async engine, imported lazily), ``loading`` (what is served), ``adapters`` (which adapters are
loaded and active), ``scheduler`` and ``batch`` (iteration-level batched decoding over a narrow
:class:`~.batch.BatchModel`, returning :class:`~.batch.StepStats`), ``kv`` (the decode KV cache, grown in
place), ``prefix_cache`` (KV states of prompt blocks reused across requests), ``sampling``, ``output``
(chunks, results, incremental detokenization), ``cache`` (the response cache), ``work`` (a request ready
to decode).

May import: llmstack.errors, config, registry, models and serve.protocol; never Ray or the HTTP layer.
"""

from __future__ import annotations

from llmstack.serve.engine.base import Engine
from llmstack.serve.engine.cache import ResponseCache
from llmstack.serve.engine.loading import AdapterSpec, ServedModel, resolve_adapters
from llmstack.serve.engine.preparation import RequestPreparer
from llmstack.serve.engine.protocol import EngineProtocol
from llmstack.serve.engine.transformers import TransformersEngine
from llmstack.serve.engine.work import Work

__all__ = ["AdapterSpec", "Engine", "EngineProtocol", "ServedModel", "RequestPreparer", "ResponseCache",
           "TransformersEngine", "Work", "resolve_adapters"]
