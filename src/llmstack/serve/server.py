"""The model deployment: one engine per replica, ``@serve.batch`` for batching, ``@serve.multiplexed`` for adapters.

``LLMServer`` exposes the engine protocol to other deployments through its handle. Errors come back
as :class:`~llmstack.serve.protocol.ErrorInfo` values (never exceptions), so their status code and
OpenAI fields survive the trip between processes.

Batching: ``@serve.batch`` collects up to ``max_batch_size`` requests (waiting at most
``batch_wait_timeout_s``) and hands them to :meth:`TransformersEngine.run_batch`, an async generator
that yields one list per decode step. Serve splits a batch by multiplexed model id first, so every
batch decodes with one adapter. ``max_ongoing_requests`` must be at least ``max_batch_size`` or
batches could never fill.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from llmstack.config import ServeConfig, load_config
from llmstack.serve.protocol import EngineError, ErrorInfo, GenerationChunk, GenerationRequest, GenerationResult, ModelCard

logger = logging.getLogger("ray.serve")


class _AdapterLease:
    """What ``@serve.multiplexed`` caches per adapter; its ``__del__`` (called on LRU eviction) unloads it."""

    def __init__(self, engine: Any, adapter: str) -> None:
        self.engine = engine
        self.adapter = adapter
        self._released = False

    def __del__(self) -> None:
        if self._released:
            return
        self._released = True
        try:  # run on the engine thread, after any forward pass in flight
            self.engine._executor.submit(self.engine.unload_adapter, self.adapter).result(timeout=60)
        except Exception:  # interpreter shutdown or engine already closed
            pass


@serve.deployment(name="LLMServer")
class LLMServer:
    """A replica serving one base model (and its adapters) through the engine protocol."""

    def __init__(self, config: dict[str, Any]) -> None:
        import torch

        from llmstack.registry import Registry
        from llmstack.serve.engine import TransformersEngine

        cfg = load_config(ServeConfig, config)
        self.config = cfg
        torch.set_num_threads(max(1, int(cfg.num_cpus)))
        registry = Registry(cfg.registry) if cfg.registry else Registry()
        self.engine = TransformersEngine.from_source(
            cfg.model, registry=registry, adapters=cfg.adapters, default_max_tokens=cfg.default_max_tokens,
            max_tokens_limit=cfg.max_tokens_limit, max_n=cfg.max_n, cache_size=cfg.response_cache_size,
            aliases=cfg.model_aliases, max_batch_rows=cfg.max_batch_size)
        engine = self.engine

        async def decode(works: list[Any]) -> AsyncIterator[list[Any]]:
            async for outputs in engine.run_batch(works):
                yield outputs

        # Built per instance so the sizes come from the config rather than the class definition.
        self._batched = serve.batch(max_batch_size=cfg.max_batch_size, batch_wait_timeout_s=cfg.batch_wait_timeout_s,
                                    max_concurrent_batches=cfg.max_concurrent_batches)(decode)

        async def load_adapter(model_id: str) -> _AdapterLease:
            await engine.acquire_adapter(model_id)
            engine.release_adapter(model_id)
            return _AdapterLease(engine, model_id)

        self._adapter = serve.multiplexed(max_num_models_per_replica=cfg.max_adapters_per_replica)(load_adapter)

    # ------------------------------------------------------------------ engine protocol over a handle

    async def generate(self, request: GenerationRequest) -> GenerationResult | ErrorInfo:
        from llmstack.serve.engine import assemble

        chunks: list[GenerationChunk] = []
        work = None
        try:
            work = self.engine.prepare(request)
            async for chunk in self._chunks(work):
                chunks.append(chunk)
        except EngineError as exc:
            return exc.to_info()
        except Exception as exc:  # a bug or a broken model: report it, keep the replica up
            logger.exception("generation failed")
            return ErrorInfo(message=f"generation failed: {type(exc).__name__}: {exc}", status_code=500,
                             type="server_error")
        return assemble(chunks, work)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk | ErrorInfo]:
        try:
            work = self.engine.prepare(request)
            async for chunk in self._chunks(work):
                yield chunk
        except EngineError as exc:
            yield exc.to_info()
        except Exception as exc:
            logger.exception("generation failed")
            yield ErrorInfo(message=f"generation failed: {type(exc).__name__}: {exc}", status_code=500,
                            type="server_error")

    async def _chunks(self, work: Any) -> AsyncIterator[GenerationChunk]:
        from llmstack.serve.engine import replay

        hit = self.engine.lookup(work)
        if hit is not None:
            for chunk in replay(hit):
                yield chunk
            return
        routed = serve.get_multiplexed_model_id() or None
        if routed != work.adapter:
            raise EngineError(f"request for {work.request.model!r} was routed with multiplexed_model_id={routed!r}; "
                              f"call the handle with .options(multiplexed_model_id={work.adapter or ''!r})")
        if work.adapter is not None:
            await self._adapter(work.adapter)  # LRU-bounded load through @serve.multiplexed
        await self.engine.acquire_adapter(work.adapter)
        try:
            async for chunk in self._batched(work):
                yield chunk
        finally:
            # Client gone, timeout or done: a cancelled work leaves its batch at the next step.
            work.cancelled = True
            self.engine.release_adapter(work.adapter)

    async def abort(self, request_id: str) -> bool:
        return await self.engine.abort(request_id)

    async def models(self) -> list[ModelCard]:
        return await self.engine.models()

    async def check_health(self) -> None:
        """Serve calls this periodically; raising marks the replica unhealthy and replaces it."""
        await self.engine.check_health()

    async def stats(self) -> dict[str, Any]:
        """Counters for tests and benchmarks: requests, cancellations, tokens, adapters, cache."""
        return {**self.engine.stats, "loaded_adapters": self.engine.loaded_adapters(),
                "cache_hits": self.engine.cache.hits, "cache_misses": self.engine.cache.misses}

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
