"""The engine contract: everything a replica (``LLMServer``) and the HTTP layer call of an engine.

An engine is a subclass of :class:`Engine`. It holds a :class:`~.preparation.RequestPreparer` (model ids,
validation, chat template, tokenization, response cache: the same for every engine) and implements the
decoding and adapter methods marked abstract. Everything else (``prepare``, ``run``, ``generate``,
``stream``, ``models``) is written once here, so a third engine implements only what differs.

Optional capability: an engine whose :attr:`Engine.group_batching` is True decodes a group of requests
together in :meth:`Engine.run_batch`, and the replica feeds it from ``@serve.batch``; any other engine
batches by itself (vLLM's continuous batching) or not at all, and decodes one request at a time in
:meth:`Engine.decode`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Any, ClassVar

from llmstack.errors import RequestError
from llmstack.serve.engine.cache import ResponseCache
from llmstack.serve.engine.output import assemble, replay
from llmstack.serve.engine.preparation import RequestPreparer
from llmstack.serve.engine.work import Work
from llmstack.serve.protocol import GenerationChunk, GenerationRequest, GenerationResult, ModelCard, Timing

if TYPE_CHECKING:
    from llmstack.config import ServeConfig
    from llmstack.serve.engine.loading import AdapterSpec

# What decodes a work into chunks: the engine's own :meth:`Engine.decode`, or the replica's ``@serve.batch``
# function feeding :meth:`Engine.run_batch`.
WorkDecoder = Callable[[Work], AsyncIterator[GenerationChunk]]


class Engine(ABC):
    """A served model (and its adapters) behind :class:`~llmstack.serve.engine.EngineProtocol`, plus the
    hooks a Serve replica uses: request preparation, decoding with an adapter held, adapter leases, stats.

    A subclass sets :attr:`preparer` and :attr:`executor` when it is built and implements the abstract
    methods. Chunks it yields follow :class:`~llmstack.serve.protocol.GenerationChunk`: text deltas per
    choice, and a last chunk with ``finished=True`` carrying usage and timing.
    """

    #: True: :meth:`run_batch` decodes a group of works together and the replica feeds it from
    #: ``@serve.batch``. False: the engine batches by itself, or not at all; run_batch is never called.
    group_batching: ClassVar[bool] = False

    #: Model ids, validation, tokenization and the response cache (shared code, one instance per engine).
    preparer: RequestPreparer
    #: Runs engine work off the event loop; the replica unloads an adapter evicted by ``@serve.multiplexed``
    #: on it (``executor.submit(engine.unload_adapter, id)``), so an engine with one model thread uses that one.
    executor: Executor

    # ------------------------------------------------------------------ building

    @classmethod
    @abstractmethod
    def from_config(cls, cfg: ServeConfig) -> Engine:
        """What a Serve replica runs: the engine for ``cfg``'s model, adapters and limits (loaded and ready)."""

    # ------------------------------------------------------------------ what the preparer knows

    @property
    def model_id(self) -> str:
        return self.preparer.model_id

    @property
    def root(self) -> str:
        return self.preparer.root

    @property
    def identity(self) -> str:
        return self.preparer.identity

    @property
    def aliases(self) -> list[str]:
        return self.preparer.aliases

    @property
    def adapters(self) -> Mapping[str, AdapterSpec]:
        return self.preparer.adapters

    @property
    def tokenizer(self) -> Any:
        return self.preparer.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.preparer.max_model_len

    @property
    def cache(self) -> ResponseCache:
        """The response cache (replaceable, e.g. by a test wanting one)."""
        return self.preparer.cache

    @cache.setter
    def cache(self, cache: ResponseCache) -> None:
        self.preparer.cache = cache

    # ------------------------------------------------------------------ the HTTP-facing protocol

    async def models(self) -> list[ModelCard]:
        """The base model and its adapters, as ``/v1/models`` lists them."""
        return self.preparer.cards()

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        """Decode ``request`` whole (a batch of one where the engine batches groups)."""
        work = self.prepare(request)
        return assemble([chunk async for chunk in self.run(work)], work)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Decode ``request``, yielding chunks as text is produced; closing the stream cancels it."""
        async for chunk in self.run(self.prepare(request)):
            yield chunk

    @abstractmethod
    async def abort(self, request_id: str) -> bool:
        """Stop the running request ``request_id`` soon (its stream then ends); False when none runs."""

    @abstractmethod
    async def check_health(self) -> None:
        """Return when the engine can serve; raise a 503 :class:`RequestError` when it cannot (Serve then
        replaces the replica)."""

    # ------------------------------------------------------------------ the replica's hooks

    def prepare(self, request: GenerationRequest) -> Work:
        """Validate and tokenize ``request`` (a :class:`RequestError` naming the bad field otherwise)."""
        return self.preparer.prepare(request)

    async def run(self, work: Work, *, decode: WorkDecoder | None = None,
                  before_decode: Callable[[Work], Awaitable[Any]] | None = None) -> AsyncIterator[GenerationChunk]:
        """The chunks of one prepared work: a response-cache hit replayed, or decoded with its adapter held
        (and the finished result of a cacheable work remembered).

        ``decode`` defaults to :meth:`decode`; a replica of a :attr:`group_batching` engine passes its
        ``@serve.batch`` function, and as ``before_decode`` its routing check and adapter loader.
        """
        cached = self.preparer.lookup(work)
        if cached is not None:
            for chunk in replay(cached):
                yield chunk
            return
        if before_decode is not None:
            await before_decode(work)
        await self.acquire_adapter(work.adapter)
        kept: list[GenerationChunk] | None = [] if work.cache_key is not None else None
        try:
            async for chunk in (decode or self.decode)(work):
                if kept is not None:
                    kept.append(chunk)
                    if chunk.finished:
                        self.remember(work, kept)
                yield chunk
        finally:
            if not work.reported:
                work.cancelled = True  # client gone, timeout or error: the engine drops it at its next step
            self.release_adapter(work.adapter)

    def remember(self, work: Work, chunks: list[GenerationChunk]) -> None:
        """Put a finished work's result in the response cache (per-request timing and prefix counts left out)."""
        result = assemble(chunks, work).model_copy(update={"timing": Timing(), "prefix_cached_tokens": None})
        self.preparer.remember(work, result)

    @abstractmethod
    def decode(self, work: Work) -> AsyncIterator[GenerationChunk]:
        """Decode one prepared work (its adapter already acquired) into chunks, the last one ``finished``.

        Must set ``work.reported`` once the finished chunk is made, stop early once ``work.cancelled`` is
        set, and count a request that ends unfinished as cancelled in :meth:`replica_stats`.
        """

    async def run_batch(self, works: list[Work]) -> AsyncIterator[list[GenerationChunk | type[StopIteration]]]:
        """Optional (:attr:`group_batching`): decode ``works`` (one adapter) together; each step yields, per
        work, its new chunk or ``StopIteration`` once it is done."""
        raise RequestError(f"{type(self).__name__} does not decode groups of requests (group_batching is False); "
                           f"call run() per request", status_code=500, type="server_error")
        yield []  # pragma: no cover - makes this an async generator like the implementations

    @abstractmethod
    async def acquire_adapter(self, adapter: str | None) -> None:
        """Make sure ``adapter`` (None: the base model, nothing to do) is loaded, and count the caller as a user
        until :meth:`release_adapter`; a load failure is a 500 :class:`RequestError` naming the adapter."""

    @abstractmethod
    def release_adapter(self, adapter: str | None) -> None:
        """One user of ``adapter`` fewer; an unload that waited for the last user happens now."""

    @abstractmethod
    def unload_adapter(self, adapter: str) -> None:
        """Drop ``adapter``'s weights now, or once its last user releases it (run on :attr:`executor`)."""

    @abstractmethod
    def loaded_adapters(self) -> list[str]:
        """The adapter ids whose weights are loaded now."""

    @abstractmethod
    def replica_stats(self) -> dict[str, Any]:
        """Counters for ``LLMServer.stats`` (tests, benchmarks): at least ``requests``, ``cancelled``,
        ``generated_tokens``, ``loaded_adapters``, ``cache_hits`` and ``cache_misses``."""

    @abstractmethod
    def shutdown(self) -> None:
        """Release the model and threads; the replica calls this once, when it goes away."""


__all__ = ["Engine", "WorkDecoder"]
