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
import logging
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, ClassVar

from llmstack.errors import RequestError
from llmstack.serve.engine.adapters import AdapterSlots
from llmstack.serve.engine.base import Engine
from llmstack.serve.engine.batch import StepStats
from llmstack.serve.engine.compiled import STAT_KEYS, CompiledDecoder, check_buckets
from llmstack.serve.engine.loading import AdapterSpec, ServedModel, resolve_adapters
from llmstack.serve.engine.output import assemble
from llmstack.serve.engine.preparation import RequestPreparer, eos_token_ids
from llmstack.serve.engine.prefix_cache import PrefixCache
from llmstack.serve.engine.scheduler import Group, Scheduler
from llmstack.serve.engine.work import Work
from llmstack.serve.protocol import GenerationChunk, GenerationRequest, GenerationResult

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from llmstack.config import ServeConfig
    from llmstack.registry import Registry


class TransformersEngine(Engine):
    """A transformers causal LM (plus optional LoRA adapters) behind the :class:`Engine` contract.

    It batches groups itself (:meth:`run_batch`, fed by the replica's ``@serve.batch``) and is what
    :mod:`.batch` and :mod:`.scheduler` decode with (:class:`~.batch.BatchModel`: ``forward``, its KV and
    prefix caches); their step statistics land in :attr:`stats`.

    Args:
        loaded: the model, tokenizer and identity (:meth:`ServedModel.of_artifact`).
        adapters: adapters served on the same base, loaded lazily by :meth:`load_adapter`.
        default_max_tokens: used when a request gives no ``max_tokens``.
        max_tokens_limit: largest ``max_tokens`` accepted.
        max_n: cap on choices per request.
        cache_size: entries of the response cache (0 disables it).
        prefix_cache_mb: memory for the prefix cache's KV blocks (0 disables it).
        prepack_weights: hold linear weights prepacked for oneDNN (:mod:`.kernels`) when no adapters are served
            and the decode step is not compiled.
        lean_forward: run LLaMA-family models through :class:`.lean.LeanForward` (fused projections, no
            transformers module overhead) under the same conditions; other models keep transformers' forward.
        compile_decode: decode steps through ``torch.compile`` over KV buckets (:mod:`.compiled`).
        kv_buckets: the KV capacities of the compiled path (None: powers of two from 128 to the max length).
        compile_freezing: inductor's freezing on the compiled path (weights folded and prepacked).
    """

    group_batching: ClassVar[bool] = True

    def __init__(self, loaded: ServedModel, *, adapters: Iterable[AdapterSpec] = (), default_max_tokens: int = 64,
                 max_tokens_limit: int = 512, max_n: int = 4, cache_size: int = 256,
                 aliases: Iterable[str] = (), max_batch_rows: int | None = None,
                 prefix_cache_mb: float = 0, prepack_weights: bool = False, compile_decode: bool = False,
                 kv_buckets: Sequence[int] | None = None, compile_freezing: bool = False,
                 lean_forward: bool = False) -> None:
        import torch

        from llmstack.models.kv_cache import cache_kwarg
        from llmstack.serve.engine.kv import has_sliding_window, new_cache

        self.max_batch_rows = max_batch_rows  # cap on sequences per forward pass (None: no cap)
        self.stats = {"requests": 0, "cancelled": 0, "generated_tokens": 0, "batches": 0, "max_batch_size": 0,
                      "adapter_loads": 0, "adapter_unloads": 0, "forward_passes": 0,
                      "prefix_queries": 0, "prefix_hits": 0, "prefix_hit_tokens": 0}
        self._adapters = AdapterSlots(loaded.model, adapters, stats=self.stats, on_unload=self._forget_adapter)
        self._config = loaded.model.config
        loaded.model.eval()
        # Adapters wrap nn.Linear (peft): a model that may carry one keeps its plain layers. The compiled path
        # traces plain layers (inductor packs them itself with compile_freezing).
        may_carry_adapter = bool(self._adapters.specs) or loaded.adapter_dir is not None or (
            loaded.artifact is not None and loaded.artifact.kind == "adapter")
        growing = new_cache(self._config) is not None  # else the model's own cache: no prefix reuse, no merging
        self._lean: Any = None
        self.stats["lean_forward"] = 0
        if lean_forward and not may_carry_adapter and not compile_decode and growing:
            from llmstack.serve.engine.lean import LeanForward, lean_unsupported

            reason = lean_unsupported(loaded.model)
            if reason is None:  # before packing: the lean forward fuses the plain projections, then packs them
                self._lean = LeanForward(loaded.model, pack=prepack_weights)
                self.stats["lean_forward"] = 1
            else:
                log.info("transformers' forward serves this model: %s", reason)
        if prepack_weights and not may_carry_adapter and not compile_decode:
            from llmstack.serve.engine.kernels import prepack_linears

            self.stats["packed_linears"] = prepack_linears(loaded.model)
        self.preparer = RequestPreparer(
            loaded.tokenizer, model_id=loaded.model_id, root=loaded.root, identity=loaded.identity,
            source=loaded.source, aliases=aliases, adapters=self._adapters.specs,
            vocab_size=self._config.vocab_size,
            max_model_len=int(getattr(self._config, "max_position_embeddings", 0) or 2048),
            default_max_tokens=default_max_tokens, max_tokens_limit=max_tokens_limit, max_n=max_n,
            cache_size=cache_size)
        self.prefix_cache = PrefixCache(int(prefix_cache_mb * 2**20)) if prefix_cache_mb > 0 and growing else None
        # Sliding-window masks count cache columns: a row's cached and new prompt tokens must then be adjacent.
        self.contiguous_prefill = has_sliding_window(self._config)
        self._tokenizer_identity = tokenizer_identity(self.tokenizer)
        self.eos_ids = eos_token_ids(self.tokenizer, getattr(loaded.model, "generation_config", None), self._config)
        self.device = next(loaded.model.parameters()).device
        self._kv_buckets: tuple[int, ...] = ()
        self._decoder: CompiledDecoder | None = None
        for name in STAT_KEYS:
            self.stats[name] = 0
        if compile_decode:
            self._kv_buckets = check_buckets(kv_buckets, self.preparer.max_model_len)
            unsupported = None
            if not growing:
                unsupported = f"{type(loaded.model).__name__} builds its own KV cache"
            elif self.contiguous_prefill:
                unsupported = "sliding-window attention layers"
            elif may_carry_adapter:
                unsupported = "adapters (their weights switch per batch)"
            self._decoder = CompiledDecoder(loaded.model, stats=self.stats, unsupported=unsupported,
                                            freezing=compile_freezing)
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
        """Load ``source`` (registry ref or directory) and the ``adapters`` entries, then build the engine.

        ``dtype`` (``engine.dtype``): ``auto`` serves the stored dtype (float16 as bfloat16); one this CPU cannot
        compute in is refused (:mod:`.precision`).
        """
        from llmstack.models import describe_artifact, load_artifact
        from llmstack.serve.engine.precision import resolve_engine_dtype

        artifact = describe_artifact(source, registry=registry, storage_options=storage_options)
        dtype = resolve_engine_dtype(artifact, dtype)
        loaded = ServedModel.of_artifact(load_artifact(artifact, registry=registry, dtype=dtype), source=source)
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
            dtype=cfg.engine.dtype,
            default_max_tokens=cfg.engine.default_max_tokens, max_tokens_limit=cfg.engine.max_tokens_limit,
            max_n=cfg.engine.max_n,
            cache_size=cfg.engine.response_cache_size, aliases=cfg.model_aliases,
            max_batch_rows=cfg.engine.max_batch_size,
            prefix_cache_mb=cfg.engine.prefix_cache_mb, prepack_weights=cfg.engine.prepack_weights,
            compile_decode=cfg.engine.compile, kv_buckets=cfg.engine.kv_buckets, lean_forward=cfg.engine.lean_forward)

    # ------------------------------------------------------------------ protocol

    async def check_health(self) -> None:
        if self.executor._shutdown:  # noqa: SLF001 - the one thread that runs the model
            raise RequestError("engine is shut down", status_code=503, type="service_unavailable")

    async def abort(self, request_id: str) -> bool:
        work = self._works.get(request_id)
        if work is None:
            return False
        work.cancelled = True
        return True

    async def decode(self, work: Work) -> AsyncIterator[GenerationChunk]:
        """One work decoded as a batch of one (it still joins the adapter's running batch)."""
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
        for chunks, work in zip(parts, works):
            if work.cache_key is not None and chunks and chunks[-1].finished:
                self.remember(work, chunks)
        return [assemble(chunks, w) for chunks, w in zip(parts, works)]

    # ------------------------------------------------------------------ KV and prefix caches

    def new_cache(self) -> Any:
        """An empty KV cache for a prefill (None: let the model build its own)."""
        from llmstack.serve.engine.kv import new_cache

        return new_cache(self._config, self._kv_buckets if self._decoder is not None and self._decoder.active else ())

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
        modules = [*self.model.modules(), *(self._lean.modules() if self._lean is not None else ())]
        linears = Counter(type(m).__name__ for m in modules if "Linear" in type(m).__name__)
        return {**self.stats, "loaded_adapters": self.loaded_adapters(),
                "cache_hits": self.cache.hits, "cache_misses": self.cache.misses,
                "linear_modules": dict(linears)}  # which kernels the replica really runs (int8, 4-bit, float)

    def forward(self, adapter: str | None, **inputs: Any) -> Any:
        """One forward pass with ``adapter`` active (engine thread only); ``cache`` is the KV cache or None."""
        import torch

        cache = inputs.pop("cache", None)
        decoder = self._decoder
        if decoder is not None and decoder.active and adapter is None and cache is not None \
                and inputs["input_ids"].shape[1] == 1:
            from transformers.modeling_outputs import CausalLMOutputWithPast

            with torch.inference_mode():
                logits = decoder.decode(cache, inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"])
            if logits is not None:
                return CausalLMOutputWithPast(logits=logits, cache=cache)
        if self._lean is not None and adapter is None and cache is not None:
            from transformers.modeling_outputs import CausalLMOutputWithPast

            with torch.inference_mode():
                logits = self._lean(inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"], cache)
            return CausalLMOutputWithPast(logits=logits, cache=cache)
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
            scheduler = self._schedulers[works[0].adapter] = Scheduler(self, works[0].adapter, record=self._record)
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

    def _record(self, step: StepStats) -> None:
        """Add one decode step's statistics to :attr:`stats` (engine thread)."""
        step.add_to(self.stats)

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


def tokenizer_identity(tokenizer: Any) -> str:
    """A digest of the tokenizer's vocabulary and rules (its class and size where it cannot serialise)."""
    import hashlib

    backend = getattr(tokenizer, "backend_tokenizer", None)
    try:
        text = backend.to_str() if backend is not None else f"{type(tokenizer).__name__}:{len(tokenizer)}"
    except Exception:  # noqa: BLE001
        text = f"{type(tokenizer).__name__}:{len(tokenizer)}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


__all__ = ["TransformersEngine"]
