"""The transformers engine: a causal LM (and adapters on it) behind the engine protocol. No HTTP, no Ray.

It serves full models, merged models, peft adapters on a base (several at once) and the quantized
artifacts of ``quantize()``. Decoding is batched (see :mod:`.scheduler` and :mod:`.batch`): requests
join a running batch at step boundaries, each sequence with its own sampling parameters and RNG;
because padding is masked and positions are computed per row, greedy decoding gives each request
the tokens it would get alone.

Example:
    >>> engine = TransformersEngine.from_source("tiny-lm@production")  # doctest: +SKIP
    >>> asyncio.run(engine.generate(GenerationRequest(model="tiny-lm", prompt="def ")))  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from llmstack.errors import ModelLoadError, RequestError, model_not_found
from llmstack.serve.engine.adapters import AdapterSlots
from llmstack.serve.engine.cache import ResponseCache
from llmstack.serve.engine.loading import AdapterSpec, LoadedModel, load_served_model, resolve_adapters
from llmstack.serve.engine.output import assemble, replay
from llmstack.serve.engine.prefix_cache import PrefixCache
from llmstack.serve.engine.scheduler import Group, Scheduler
from llmstack.serve.engine.work import Work
from llmstack.serve.protocol import GenerationChunk, GenerationRequest, GenerationResult, ModelCard, Timing

if TYPE_CHECKING:
    from llmstack.config import ServeConfig
    from llmstack.registry import Registry

# What decodes a work: the engine's own batch of one, or the Serve deployment's @serve.batch function.
Decoder = Callable[[Work], AsyncIterator[GenerationChunk]]


class TransformersEngine:
    """A transformers causal LM (plus optional LoRA adapters) behind :class:`EngineProtocol`.

    Args:
        loaded: the model, tokenizer and identity from :func:`load_served_model`.
        adapters: adapters served on the same base, loaded lazily by :meth:`load_adapter`.
        default_max_tokens: used when a request gives no ``max_tokens``.
        max_tokens_limit: largest ``max_tokens`` accepted.
        max_n: cap on choices per request.
        cache_size: entries of the response cache (0 disables it).
        prefix_cache_mb: memory for the prefix cache's KV blocks (0 disables it).
    """

    def __init__(self, loaded: LoadedModel, *, adapters: Iterable[AdapterSpec] = (), default_max_tokens: int = 64,
                 max_tokens_limit: int = 512, max_n: int = 4, cache_size: int = 256,
                 aliases: Iterable[str] = (), max_batch_rows: int | None = None,
                 prefix_cache_mb: float = 0) -> None:
        import torch

        from llmstack.models.kv_cache import cache_kwarg
        from llmstack.serve.engine.kv import has_sliding_window, new_cache

        self.tokenizer = loaded.tokenizer
        self.model_id = loaded.model_id
        self.root = loaded.root
        self.identity = loaded.identity
        self.aliases = sorted({a for a in (loaded.root, loaded.source, *aliases) if a and a != loaded.model_id})
        self.default_max_tokens = default_max_tokens
        self.max_tokens_limit = max_tokens_limit
        self.max_n = max_n
        self.max_batch_rows = max_batch_rows  # cap on sequences per forward pass (None: no cap)
        self.stats = {"requests": 0, "cancelled": 0, "generated_tokens": 0, "batches": 0, "max_batch_size": 0,
                      "adapter_loads": 0, "adapter_unloads": 0, "forward_passes": 0,
                      "prefix_queries": 0, "prefix_hits": 0, "prefix_hit_tokens": 0}
        self._adapters = AdapterSlots(loaded.model, adapters, stats=self.stats, on_unload=self._forget_adapter)
        self.adapters = self._adapters.specs
        if self.model_id in self.adapters:
            raise ModelLoadError(f"adapter id {self.model_id!r} collides with the base model's id")
        self.cache = ResponseCache(cache_size)
        self._config = loaded.model.config
        growing = new_cache(self._config) is not None  # else the model's own cache: no prefix reuse, no merging
        self.prefix_cache = PrefixCache(int(prefix_cache_mb * 2**20)) if prefix_cache_mb > 0 and growing else None
        # Sliding-window masks count cache columns: a row's cached and new prompt tokens must then be adjacent.
        self.contiguous_prefill = has_sliding_window(self._config)
        self._tokenizer_identity = tokenizer_identity(self.tokenizer)
        loaded.model.eval()
        self.max_model_len = int(getattr(loaded.model.config, "max_position_embeddings", 0) or 2048)
        self.eos_ids = _eos_ids(loaded.model, self.tokenizer)
        self.device = next(loaded.model.parameters()).device
        # Grad mode is per thread: switch it off in the one thread that runs the model, never in the caller's.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmstack-engine",
                                           initializer=torch.set_grad_enabled, initargs=(False,))
        self._works: dict[str, Work] = {}
        self._schedulers: dict[str | None, Scheduler] = {}
        self._cache_kwarg = cache_kwarg(loaded.model)
        if loaded.adapter_dir is not None:
            self._adapters.attach_default(loaded.adapter_dir)
        elif loaded.artifact is not None and loaded.artifact.kind == "adapter":
            self._adapters.note_default()

    @property
    def model(self) -> Any:
        """The served model (the base wrapped by peft once an adapter is attached)."""
        return self._adapters.model

    @classmethod
    def from_source(cls, source: str, *, registry: Registry | None = None, adapters: Iterable[str] = (),
                    dtype: str = "auto", storage_options: dict[str, Any] | None = None,
                    **limits: Any) -> TransformersEngine:
        """Load ``source`` (registry ref or directory) and the ``adapters`` entries, then build the engine."""
        loaded = load_served_model(source, registry=registry, dtype=dtype)
        specs = resolve_adapters(adapters, registry=registry, base=loaded.artifact, storage_options=storage_options)
        return cls(loaded, adapters=specs, **limits)

    @classmethod
    def from_config(cls, cfg: ServeConfig) -> TransformersEngine:
        """What a Serve replica runs: the config's model and adapters, its limits, its compute threads."""
        import torch

        from llmstack.registry import Registry

        torch.set_num_threads(cfg.compute_threads())
        return cls.from_source(
            cfg.model, registry=Registry(cfg.registry) if cfg.registry else Registry(), adapters=cfg.adapters,
            default_max_tokens=cfg.default_max_tokens, max_tokens_limit=cfg.max_tokens_limit, max_n=cfg.max_n,
            cache_size=cfg.response_cache_size, aliases=cfg.model_aliases, max_batch_rows=cfg.max_batch_size,
            prefix_cache_mb=cfg.prefix_cache_mb)

    # ------------------------------------------------------------------ protocol

    async def models(self) -> list[ModelCard]:
        cards = [ModelCard(id=self.model_id, root=self.root, aliases=self.aliases, max_model_len=self.max_model_len)]
        cards += [ModelCard(id=a.id, root=a.source, parent=self.model_id, max_model_len=self.max_model_len)
                  for a in self.adapters.values()]
        return cards

    async def check_health(self) -> None:
        if self.executor._shutdown:  # noqa: SLF001 - the one thread that runs the model
            raise RequestError("engine is shut down", status_code=503, type="service_unavailable")

    async def abort(self, request_id: str) -> bool:
        work = self._works.get(request_id)
        if work is None:
            return False
        work.cancelled = True
        return True

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        work = self.prepare(request)
        return assemble([chunk async for chunk in self.run(work)], work)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        async for chunk in self.run(self.prepare(request)):
            yield chunk

    async def run(self, work: Work, *, decode: Decoder | None = None,
                  before_decode: Callable[[Work], Awaitable[Any]] | None = None) -> AsyncIterator[GenerationChunk]:
        """The chunks of one prepared work: a cache hit replayed, or decoded with its adapter held.

        ``decode`` defaults to a batch of one; the Serve deployment passes its ``@serve.batch``
        function, and as ``before_decode`` its routing check and ``@serve.multiplexed`` adapter loader.
        """
        cached = self.lookup(work)
        if cached is not None:
            for chunk in replay(cached):
                yield chunk
            return
        if before_decode is not None:
            await before_decode(work)
        await self.acquire_adapter(work.adapter)
        try:
            async for chunk in (decode or self._decode_alone)(work):
                yield chunk
        finally:
            if not work.reported:
                work.cancelled = True  # client gone, timeout or error: its rows leave the batch at the next step
            self.release_adapter(work.adapter)

    async def _decode_alone(self, work: Work) -> AsyncIterator[GenerationChunk]:
        async for outputs in self.run_batch([work]):
            if isinstance(outputs[0], GenerationChunk):
                yield outputs[0]

    async def generate_batch(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Decode ``requests`` as one batch (they must name the same model); results in order."""
        works = [self.prepare(r) for r in requests]
        if len({w.adapter for w in works}) > 1:
            raise RequestError("one batch serves one model; split requests by model first")
        parts: list[list[GenerationChunk]] = [[] for _ in works]
        await self.acquire_adapter(works[0].adapter)
        try:
            async for outputs in self.run_batch(works):
                for i, out in enumerate(outputs):
                    if isinstance(out, GenerationChunk):
                        parts[i].append(out)
        finally:
            self.release_adapter(works[0].adapter)
        return [assemble(chunks, w) for chunks, w in zip(parts, works)]

    # ------------------------------------------------------------------ validation

    def served_ids(self) -> list[str]:
        return [self.model_id, *self.adapters]

    def adapter_for(self, model: str) -> str | None:
        """The adapter id a request's ``model`` selects (None for the base); 404 when unknown."""
        if model in self.adapters:
            return model
        if model == self.model_id or model in self.aliases:
            return None
        for spec in self.adapters.values():
            if model == spec.source:
                return spec.id
        raise model_not_found(model, self.served_ids())

    def prepare(self, request: GenerationRequest) -> Work:
        """Validate and tokenize ``request``; raises :class:`RequestError` naming the bad field."""
        adapter = self.adapter_for(request.model)
        params = request.sampling
        if params.n > self.max_n:
            raise RequestError(f"n must be at most {self.max_n}, got {params.n}", param="n")
        if params.max_tokens is not None and not 1 <= params.max_tokens <= self.max_tokens_limit:
            raise RequestError(f"max_tokens must be in [1, {self.max_tokens_limit}], got {params.max_tokens}",
                              param="max_tokens")
        if params.temperature < 0:
            raise RequestError(f"temperature must be >= 0, got {params.temperature}", param="temperature")
        if not 0 < params.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {params.top_p}", param="top_p")
        if len(params.stop) > 4:
            raise RequestError(f"at most 4 stop sequences, got {len(params.stop)}", param="stop")
        self._check_sampling(params)
        prompt_ids = self._tokenize(request)
        if not prompt_ids:
            raise RequestError("the prompt is empty", param="prompt" if request.messages is None else "messages")
        limit = self.max_model_len
        if len(prompt_ids) >= limit:
            raise RequestError(
                f"This model's maximum context length is {limit} tokens; the prompt has {len(prompt_ids)} tokens "
                f"and at least one must remain for the completion.",
                param="prompt" if request.messages is None else "messages", code="context_length_exceeded")
        if params.max_tokens is None:
            max_tokens = min(self.default_max_tokens, limit - len(prompt_ids))
        else:
            max_tokens = params.max_tokens
            if len(prompt_ids) + max_tokens > limit:
                raise RequestError(
                    f"This model's maximum context length is {limit} tokens; you requested "
                    f"{len(prompt_ids) + max_tokens} tokens ({len(prompt_ids)} in the prompt, {max_tokens} for the "
                    f"completion). Reduce the prompt or max_tokens.", param="max_tokens",
                    code="context_length_exceeded")
        work = Work(request, prompt_ids, max_tokens, adapter)
        if params.deterministic and self.cache.capacity > 0:
            adapter_identity = self.adapters[adapter].identity if adapter else None
            work.cache_key = ResponseCache.key(self.identity, adapter_identity, prompt_ids, params, max_tokens)
        return work

    def _tokenize(self, request: GenerationRequest) -> list[int]:
        if request.messages is not None:
            for i, message in enumerate(request.messages):
                _check_text(message.get("content"), f"messages[{i}].content")
            if not getattr(self.tokenizer, "chat_template", None):
                raise RequestError(f"model {request.model!r} has no chat template; use /v1/completions",
                                  param="messages")
            try:  # the template places the special tokens (BOS included): none are added on top
                encoded = self.tokenizer.apply_chat_template(request.messages, tokenize=True, return_dict=True,
                                                             add_generation_prompt=True)
            except Exception as exc:  # template errors are the caller's message shape
                raise RequestError(f"cannot apply the chat template: {exc}", param="messages") from None
            return list(encoded["input_ids"])
        if isinstance(request.prompt, list):
            vocab = self.model.config.vocab_size
            bad = [t for t in request.prompt if not 0 <= t < vocab]
            if bad:
                raise RequestError(f"token ids must be in [0, {vocab}), got {bad[:5]}", param="prompt")
            return list(request.prompt)
        _check_text(request.prompt, "prompt")
        # Exactly what ``tokenizer(prompt)`` gives, so a tokenizer that adds BOS (Gemma, Llama) gets it, as in
        # transformers' own generate.
        return list(self.tokenizer(request.prompt or "")["input_ids"])

    def _check_sampling(self, params: Any) -> None:
        vocab = self.model.config.vocab_size
        bad = [t for t in params.logit_bias if not 0 <= t < vocab]
        if bad:
            raise RequestError(f"logit_bias token ids must be in [0, {vocab}), got {bad[:5]}", param="logit_bias")

    # ------------------------------------------------------------------ cache

    def lookup(self, work: Work) -> GenerationResult | None:
        if work.cache_key is None:
            return None
        hit = self.cache.get(work.cache_key)
        if hit is None:
            return None
        now = time.time()
        elapsed = now - work.request.arrival_time
        return hit.model_copy(update={"request_id": work.request.request_id, "cached": True, "model": work.request.model,
                                      "timing": Timing(queue_s=0.0, ttft_s=elapsed, total_s=elapsed, batch_size=1)})

    def new_cache(self) -> Any:
        """An empty KV cache for a prefill (None: let the model build its own)."""
        from llmstack.serve.engine.kv import has_sliding_window, new_cache

        return new_cache(self._config)

    def prefix_namespace(self, adapter: str | None, load_name: str | None = None) -> str:
        """What prefix-cache keys share with the weights they were computed under: model version, tokenizer,
        and the adapter's identity (its content) and load (a reload under the same name starts afresh)."""
        if adapter is None:
            return f"{self.identity}|{self._tokenizer_identity}|-"
        load_name = load_name or self._adapters.load_name(adapter)
        return f"{self.identity}|{self._tokenizer_identity}|{self.adapters[adapter].identity}#{load_name}"

    def _forget_adapter(self, adapter: str, load_name: str) -> None:
        """An adapter's weights were dropped: so are its prefix blocks (no later key could reach them)."""
        if self.prefix_cache is not None:
            self.prefix_cache.drop(self.prefix_namespace(adapter, load_name))

    # ------------------------------------------------------------------ adapters

    async def acquire_adapter(self, adapter: str | None) -> None:
        """Make sure ``adapter`` is loaded and count the caller as a user until :meth:`release_adapter`."""
        if adapter is None:
            return
        self._adapters.use(adapter)
        if not self._adapters.is_loaded(adapter):
            try:
                await asyncio.get_running_loop().run_in_executor(self.executor, self._adapters.load, adapter)
            except BaseException:
                self._adapters.done(adapter)
                raise

    def release_adapter(self, adapter: str | None) -> None:
        if adapter is not None and self._adapters.done(adapter):
            self.executor.submit(self._adapters.unload, adapter)

    def load_adapter(self, adapter: str) -> None:
        """Load ``adapter`` into the model (on the engine thread)."""
        self._adapters.load(adapter)

    def unload_adapter(self, adapter: str) -> None:
        """Drop ``adapter``'s weights now, or as soon as its last running request ends (on the engine thread)."""
        self._adapters.unload(adapter)

    def loaded_adapters(self) -> list[str]:
        return self._adapters.loaded()

    def replica_stats(self) -> dict[str, Any]:
        """Counters for tests and benchmarks (``LLMServer.stats``): requests, tokens, adapters, cache, kernels."""
        linears = Counter(type(m).__name__ for m in self.model.modules() if "Linear" in type(m).__name__)
        return {**self.stats, "loaded_adapters": self.loaded_adapters(),
                "cache_hits": self.cache.hits, "cache_misses": self.cache.misses,
                "linear_modules": dict(linears)}  # which kernels the replica really runs (int8, 4-bit, float)

    def forward(self, adapter: str | None, **inputs: Any) -> Any:
        """One forward pass with ``adapter`` active (engine thread only); ``cache`` is the KV cache or None."""
        import torch

        cache = inputs.pop("cache", None)
        if cache is not None:
            inputs[self._cache_kwarg] = cache
        with torch.inference_mode(), self._adapters.select(adapter):  # grad mode is per thread
            return self.model(**inputs)

    # ------------------------------------------------------------------ batched decoding

    async def run_batch(self, works: list[Work]) -> AsyncIterator[list[GenerationChunk | type[StopIteration]]]:
        """Decode ``works`` (one adapter); each step yields, per work, a chunk or ``StopIteration`` once done.

        The works join the adapter's running batch at the next step boundary (iteration-level
        batching): a group admitted by ``@serve.batch`` never waits for an earlier group to finish.
        This is the body of the Serve deployment's ``@serve.batch`` generator, and what
        :meth:`generate` runs for a batch of one.
        """
        adapters = {w.adapter for w in works}
        if len(adapters) != 1:
            raise RequestError("one batch serves one model; split requests by model first")
        for work in works:
            self._works[work.request.request_id] = work
            self.stats["requests"] += 1
        scheduler = self._schedulers.get(works[0].adapter)
        if scheduler is None:
            scheduler = self._schedulers[works[0].adapter] = Scheduler(self, works[0].adapter)
        group = Group(works)
        scheduler.admit(group)
        try:
            done = [False] * len(works)
            while not all(done):
                outputs = await group.queue.get()
                if isinstance(outputs, BaseException):
                    raise outputs
                for i, out in enumerate(outputs):
                    done[i] = done[i] or out is StopIteration or out.finished
                yield outputs
        finally:
            for work in works:
                if not work.reported:
                    work.cancelled = True  # the consumer left: drop its rows at the next step
                self._works.pop(work.request.request_id, None)

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


def _check_text(text: Any, param: str) -> None:
    """Text must be valid Unicode (a lone surrogate such as "\\ud800" is not): a 400 naming the field."""
    if isinstance(text, str):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise RequestError(f"{param} is not valid Unicode text ({exc.reason} at position {exc.start})",
                               param=param, code="invalid_text") from None


def tokenizer_identity(tokenizer: Any) -> str:
    """A digest of the tokenizer's vocabulary and rules (its class and size where it cannot serialise)."""
    import hashlib

    backend = getattr(tokenizer, "backend_tokenizer", None)
    try:
        text = backend.to_str() if backend is not None else f"{type(tokenizer).__name__}:{len(tokenizer)}"
    except Exception:  # noqa: BLE001
        text = f"{type(tokenizer).__name__}:{len(tokenizer)}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


__all__ = ["TransformersEngine"]
