"""The model deployment: one engine per replica, ``@serve.batch`` for batching, ``@serve.multiplexed`` for adapters.

``LLMServer`` exposes the engine protocol to other deployments through its handle. Refusals and
failures are raised as llmstack errors (``RequestError`` and friends), which pickle with their
status code and OpenAI fields, so the caller re-raises exactly what the engine said.

The engine is any :class:`~llmstack.serve.engine.Engine`; the replica calls nothing outside that contract.
Each replica reports the requests waiting for their first token and the KV its running sequences hold
(:class:`~llmstack.serve.deployments.replica_metrics.ReplicaMetrics`).

Batching, for an engine with ``group_batching``: ``@serve.batch`` collects up to ``max_batch_size``
requests (waiting at most ``batch_wait_timeout_s``) and hands them to the engine's ``run_batch``, an
async generator that yields one list per decode step. Serve splits a batch by multiplexed model id
first, so every batch decodes with one adapter. ``max_ongoing_requests`` must be at least
``max_batch_size`` or batches could never fill. Any other engine (vLLM) decodes each request itself.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from llmstack._modules import import_object
from llmstack.config import ServeConfig, load_config
from llmstack.errors import LLMStackError, RequestError
from llmstack.serve.deployments.replica_metrics import ReplicaMetrics
from llmstack.serve.engine.base import Engine, WorkDecoder
from llmstack.serve.engine.output import assemble
from llmstack.serve.engine.work import Work
from llmstack.serve.http.cluster_metrics import in_ray_worker
from llmstack.serve.protocol import GenerationChunk, GenerationRequest, GenerationResult, ModelCard

logger = logging.getLogger("ray.serve")

DEFAULT_ENGINE = "llmstack.serve.engine.transformers:TransformersEngine"
ENGINES = {"transformers": DEFAULT_ENGINE, "vllm": "llmstack.serve.engine.vllm:VllmEngine"}  # ServeConfig.engine.kind


def engine_class(spec: type[Engine] | str | None) -> type[Engine]:
    """The engine class a replica runs: a class, an import path ``module:Class``, a ``ServeConfig.engine.kind``
    name, or None for the default. It must implement :class:`~llmstack.serve.engine.Engine`."""
    if isinstance(spec, type):
        found: Any = spec
    else:
        try:
            found = import_object(ENGINES.get(spec or "", spec or DEFAULT_ENGINE))
        except ImportError as exc:
            raise RequestError(f"engine {spec!r} cannot be imported: {exc}", status_code=500,
                               type="server_error", code="engine_unavailable") from None
    if not (isinstance(found, type) and issubclass(found, Engine)):
        raise RequestError(f"engine {spec!r} is {found!r}, not a subclass of llmstack.serve.engine.Engine; "
                           f"implement that class", status_code=500, type="server_error", code="engine_unavailable")
    return found


class _AdapterLease:
    """What ``@serve.multiplexed`` caches per adapter; its ``__del__`` (called on LRU eviction) unloads it."""

    def __init__(self, engine: Engine, adapter: str) -> None:
        self.engine = engine
        self.adapter = adapter
        self._released = False

    def __del__(self) -> None:
        if self._released:
            return
        self._released = True
        try:  # run on the engine thread, after any forward pass in flight
            self.engine.executor.submit(self.engine.unload_adapter, self.adapter).result(timeout=60)
        except Exception:  # interpreter shutdown or engine already closed
            pass


@serve.deployment(name="LLMServer")
class LLMServer:
    """A replica serving one base model (and its adapters) through the engine protocol.

    Args:
        config: a :class:`~llmstack.config.ServeConfig` as a dict (already resolved to pinned refs).
        engine: the :class:`~llmstack.serve.engine.Engine` subclass (or ``module:Class``) to run; default the
            config's ``engine.kind``.
    """

    def __init__(self, config: dict[str, Any], engine: type[Engine] | str | None = None) -> None:
        cfg = load_config(ServeConfig, config)
        self.config = cfg
        self.engine: Engine = engine_class(engine or cfg.engine.kind).from_config(cfg)
        engine_ = self.engine
        # requests waiting and KV held, for the ingress's cluster-wide /metrics (vllm:num_requests_waiting, ...)
        self.metrics = ReplicaMetrics(engine_.model_id,
                                      capacity_tokens=cfg.engine.max_batch_size * engine_.max_model_len,
                                      cluster_app=cfg.app_name if in_ray_worker() else None)
        self._batched: WorkDecoder | None = None  # None: the engine decodes each request itself
        if engine_.group_batching:
            async def decode(works: list[Work]) -> AsyncIterator[list[Any]]:
                async for outputs in engine_.run_batch(works):
                    yield outputs

            # Built per instance so the sizes come from the config rather than the class definition.
            self._batched = serve.batch(max_batch_size=cfg.engine.max_batch_size,
                                        batch_wait_timeout_s=cfg.engine.batch_wait_timeout_s,
                                        max_concurrent_batches=cfg.engine.max_concurrent_batches)(decode)

        async def load_adapter(model_id: str) -> _AdapterLease:
            await engine_.acquire_adapter(model_id)
            engine_.release_adapter(model_id)
            return _AdapterLease(engine_, model_id)

        self._adapter = serve.multiplexed(max_num_models_per_replica=cfg.engine.max_adapters_per_replica)(load_adapter)

    # ------------------------------------------------------------------ engine protocol over a handle

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        work = self._prepare(request)
        chunks = [chunk async for chunk in self._chunks(work)]
        return assemble(chunks, work)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        async for chunk in self._chunks(self._prepare(request)):
            yield chunk

    def _prepare(self, request: GenerationRequest) -> Work:
        try:
            return self.engine.prepare(request)
        except LLMStackError:
            raise
        except Exception as exc:
            raise _failure(exc) from None

    async def _before_decode(self, work: Work) -> None:
        routed = serve.get_multiplexed_model_id() or None
        if routed != work.adapter:
            raise RequestError(f"request for {work.request.model!r} was routed with multiplexed_model_id={routed!r}; "
                               f"call the handle with .options(multiplexed_model_id={work.adapter or ''!r})")
        if work.adapter is not None:
            await self._adapter(work.adapter)  # LRU-bounded load through @serve.multiplexed

    async def _chunks(self, work: Work) -> AsyncIterator[GenerationChunk]:
        try:
            chunks = self.engine.run(work, decode=self._batched, before_decode=self._before_decode)
            async for chunk in self.metrics.track(chunks, prompt_tokens=len(work.prompt_ids),
                                                  sequences=work.request.sampling.n):
                yield chunk
        except LLMStackError:
            raise
        except Exception as exc:  # a bug or a broken model: report it, keep the replica up
            raise _failure(exc) from None

    async def abort(self, request_id: str) -> bool:
        return await self.engine.abort(request_id)

    async def models(self) -> list[ModelCard]:
        return await self.engine.models()

    async def check_health(self) -> None:
        """Serve calls this periodically; raising marks the replica unhealthy and replaces it."""
        await self.engine.check_health()

    async def stats(self) -> dict[str, Any]:
        """Counters for tests and benchmarks: requests, cancellations, tokens, adapters, cache."""
        return {**self.engine.replica_stats(), **self.metrics.snapshot()}

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


def _failure(exc: Exception) -> RequestError:
    logger.exception("generation failed")
    return RequestError(f"generation failed: {type(exc).__name__}", status_code=500, type="server_error")
