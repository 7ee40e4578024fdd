"""The inference engine: no HTTP, no Ray. A protocol, and a transformers implementation of it.

:class:`EngineProtocol` is all the HTTP layer knows (``generate``, ``stream``, ``abort``,
``check_health``, ``models``). :class:`TransformersEngine` implements it for full models, merged
models, peft adapters on a base (several at once) and the quantized artifacts of ``quantize()``.

Batching: :meth:`TransformersEngine.run_batch` decodes many requests together: one left-padded
prefill, then one forward pass per step for every live sequence, sharing a KV cache. Each sequence
keeps its own sampling parameters, RNG, stop strings and ``max_tokens``; finished or cancelled
sequences leave the batch (their KV rows are dropped). Because padding is masked and positions are
computed per row, greedy decoding gives each request the tokens it would get alone.

Example:
    >>> engine = TransformersEngine.from_source("tiny-lm@production")  # doctest: +SKIP
    >>> asyncio.run(engine.generate(GenerationRequest(model="tiny-lm", prompt="def ")))  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from llmstack.errors import ModelLoadError
from llmstack.serve.protocol import (
    ChoiceDelta,
    ChoiceOutput,
    EngineError,
    GenerationChunk,
    GenerationRequest,
    GenerationResult,
    ModelCard,
    SamplingParams,
    Timing,
    not_found,
)

if TYPE_CHECKING:
    import torch

    from llmstack.registry import Registry


@runtime_checkable
class EngineProtocol(Protocol):
    """What the HTTP layer may ask of an engine (local object or a Ray Serve handle client)."""

    async def generate(self, request: GenerationRequest) -> GenerationResult: ...

    def stream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]: ...

    async def abort(self, request_id: str) -> bool: ...

    async def check_health(self) -> None: ...

    async def models(self) -> list[ModelCard]: ...


# --------------------------------------------------------------------------- loading


@dataclass
class AdapterSpec:
    """A LoRA adapter served on the engine's base model under ``id``."""

    id: str  # served model id (the registry name, or the directory name)
    source: str  # registry ref (pinned to name@vN), local directory or fsspec URL
    identity: str  # cache key part: never shared by two different adapters
    registry: Any = None
    storage_options: dict[str, Any] = field(default_factory=dict)

    def directory(self) -> Path:
        """A local directory holding ``adapter_config.json`` and the adapter's safetensors."""
        path = Path(self.source).expanduser()
        if path.is_dir():
            return path
        if "://" in self.source:
            return _fetch_url_dir(self.source, self.storage_options)
        return Path(self.registry.fetch(self.source))


def _fetch_url_dir(url: str, storage_options: dict[str, Any]) -> Path:
    """Copy a remote directory (any fsspec URL) into a local cache keyed by the URL."""
    import tempfile

    import fsspec

    target = Path(tempfile.gettempdir()) / "llmstack-adapters" / hashlib.sha256(url.encode()).hexdigest()[:16]
    if not (target / "adapter_config.json").is_file():
        fs, root = fsspec.core.url_to_fs(url, **storage_options)
        target.mkdir(parents=True, exist_ok=True)
        for remote in fs.find(root):
            rel = remote[len(root.rstrip("/")) + 1:]
            dest = target / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            fs.get(remote, str(dest))
    if not (target / "adapter_config.json").is_file():
        raise ModelLoadError(f"{url} holds no adapter_config.json: not a peft adapter")
    return target


def _dir_identity(path: Path) -> str:
    """Content identity of a local directory (names, sizes, mtimes): changes when files change."""
    digest = hashlib.sha256(str(path.resolve()).encode())
    for item in sorted(path.rglob("*")):
        if item.is_file():
            stat = item.stat()
            digest.update(f"{item.relative_to(path)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return "dir:" + digest.hexdigest()[:16]


def _short_name(source: str) -> str:
    from llmstack.registry import ArtifactRef

    if "://" not in source and not Path(source).expanduser().exists() and ArtifactRef.looks_like(source):
        return ArtifactRef.parse(source)[0]
    return Path(source.rstrip("/")).name


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    model_id: str  # served id
    root: str  # name@vN or the directory
    identity: str  # model-version part of cache keys
    adapter_dir: Path | None = None  # set when the served model is itself an adapter on a base
    source: str | None = None  # what the config named (e.g. name@production), accepted as a model id


def load_served_model(source: str, *, registry: Registry | None = None, dtype: str = "float32") -> LoadedModel:
    """Load what ``source`` names for serving: a full, merged, quantized model or an adapter on its base.

    Registry refs dispatch on the manifest ``kind``; a local directory with ``adapter_config.json``
    is an adapter whose base comes from ``base_model_name_or_path``.
    """
    loaded = _load_served_model(source, registry=registry, dtype=dtype)
    loaded.source = source
    return loaded


def _load_served_model(source: str, *, registry: Registry | None = None, dtype: str = "float32") -> LoadedModel:
    from llmstack.models import load_model, load_tokenizer
    from llmstack.registry import ArtifactRef, Registry

    path = Path(source).expanduser()
    if path.is_dir():
        if (path / "adapter_config.json").is_file():
            import json

            base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
            if not base:
                raise ModelLoadError(f"adapter {path} names no base model (base_model_name_or_path)")
            loaded = load_served_model(base, registry=registry, dtype=dtype)
            return LoadedModel(loaded.model, loaded.tokenizer, path.name, str(path),
                               f"{loaded.identity}+{_dir_identity(path)}", adapter_dir=path)
        model, tokenizer = load_model(str(path), dtype=dtype)
        return LoadedModel(model, tokenizer, path.name, str(path), _dir_identity(path))
    if not ArtifactRef.looks_like(source):
        raise ModelLoadError(f"model {source!r} is neither a local directory nor a registry reference (name@vN)")
    registry = registry or Registry()
    ref = registry.resolve(source)
    manifest = registry.manifest(ref)
    identity = f"{registry.url}::{ref}"
    if manifest.kind == "model":
        model, tokenizer = load_model(str(ref), registry=registry, dtype=dtype)
    elif manifest.kind == "quantized":
        from llmstack.quantize import load_quantized

        model, tokenizer = load_quantized(registry, ref)
    elif manifest.kind == "adapter":
        if not manifest.parents:
            raise ModelLoadError(f"adapter {ref} records no parent base model in its manifest")
        base = load_served_model(manifest.parents[0], registry=registry, dtype=dtype)
        directory = Path(registry.fetch(ref))
        tokenizer = base.tokenizer
        if (directory / "tokenizer.json").is_file():
            tokenizer = load_tokenizer(str(directory))
        return LoadedModel(base.model, tokenizer, ref.name, str(ref), f"{base.identity}+{identity}",
                           adapter_dir=directory)
    else:
        raise ModelLoadError(f"{ref} is a {manifest.kind!r} artifact; serve a model, adapter or quantized artifact")
    return LoadedModel(model, tokenizer, ref.name, str(ref), identity)


def resolve_adapters(entries: Iterable[str], *, registry: Registry | None,
                     storage_options: dict[str, Any] | None = None) -> list[AdapterSpec]:
    """Turn config entries (``ref``, ``path``, ``url`` or ``id=any of those``) into pinned specs."""
    from llmstack.registry import ArtifactRef, Registry

    specs: list[AdapterSpec] = []
    for entry in entries:
        served_id, sep, source = entry.partition("=")
        if not sep:
            served_id, source = "", entry
        path = Path(source).expanduser()
        if path.is_dir():
            if not (path / "adapter_config.json").is_file():
                raise ModelLoadError(f"adapter directory {path} has no adapter_config.json")
            spec = AdapterSpec(served_id or path.name, str(path), _dir_identity(path))
        elif "://" in source:
            spec = AdapterSpec(served_id or _short_name(source), source, "url:" + source,
                               storage_options=dict(storage_options or {}))
        elif ArtifactRef.looks_like(source):
            registry = registry or Registry()
            ref = registry.resolve(source)
            kind = registry.manifest(ref).kind
            if kind != "adapter":
                raise ModelLoadError(f"{ref} is a {kind!r} artifact, not an adapter")
            spec = AdapterSpec(served_id or ref.name, str(ref), f"{registry.url}::{ref}", registry=registry)
        else:
            raise ModelLoadError(f"adapter {source!r} is neither a registry reference, a directory nor a URL")
        if any(s.id == spec.id for s in specs):
            raise ModelLoadError(f"two adapters are served as {spec.id!r}; give one another id with id=source")
        specs.append(spec)
    return specs


# --------------------------------------------------------------------------- response cache


class ResponseCache:
    """LRU cache of finished deterministic results, keyed by model version, adapter and request."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, GenerationResult] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()

    @staticmethod
    def key(model_identity: str, adapter_identity: str | None, prompt_ids: list[int], sampling: SamplingParams,
            max_tokens: int) -> str:
        payload = f"{model_identity}|{adapter_identity}|{prompt_ids}|{sampling.model_dump_json()}|{max_tokens}"
        return hashlib.sha256(payload.encode()).hexdigest()

    def get(self, key: str) -> GenerationResult | None:
        with self._lock:
            result = self._items.get(key)
            if result is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return result

    def put(self, key: str, result: GenerationResult) -> None:
        if self.capacity <= 0:
            return
        with self._lock:
            self._items[key] = result
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)


# --------------------------------------------------------------------------- work items


@dataclass(eq=False)
class Work:
    """One validated request, ready to decode."""

    request: GenerationRequest
    prompt_ids: list[int]
    max_tokens: int
    adapter: str | None  # served adapter id; None: the base model
    cache_key: str | None = None
    cancelled: bool = False
    started: float | None = None  # its prefill began
    rows: list[_Row] = field(default_factory=list)
    reported: bool = False  # its last chunk went out
    batch_size: int = 0  # most sequences decoded together with it


@dataclass(eq=False)
class _Row:
    """One sequence (one choice of one request) inside a running batch."""

    work: Work
    choice: int
    params: SamplingParams
    generator: Any  # torch.Generator or None (greedy)
    max_tokens: int
    prompt_len: int
    ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0  # characters of text already sent
    finish_reason: str | None = None
    finish_sent: bool = False
    ids_sent: int = 0
    eos: bool = False  # ended on an end-of-sequence token (counted, not shown)
    first_token_time: float | None = None


# --------------------------------------------------------------------------- the engine


class TransformersEngine:
    """A transformers causal LM (plus optional LoRA adapters) behind :class:`EngineProtocol`.

    Args:
        loaded: the model, tokenizer and identity from :func:`load_served_model`.
        adapters: adapters served on the same base, loaded lazily by :meth:`load_adapter`.
        default_max_tokens: used when a request gives no ``max_tokens``.
        max_tokens_limit: largest ``max_tokens`` accepted.
        max_n: cap on choices per request.
        cache_size: entries of the response cache (0 disables it).
    """

    def __init__(self, loaded: LoadedModel, *, adapters: Iterable[AdapterSpec] = (), default_max_tokens: int = 64,
                 max_tokens_limit: int = 512, max_n: int = 4, cache_size: int = 256,
                 aliases: Iterable[str] = (), max_batch_rows: int | None = None) -> None:
        import torch

        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.model_id = loaded.model_id
        self.root = loaded.root
        self.identity = loaded.identity
        self.aliases = sorted({a for a in (loaded.root, loaded.source, *aliases) if a and a != loaded.model_id})
        self.default_max_tokens = default_max_tokens
        self.max_tokens_limit = max_tokens_limit
        self.max_n = max_n
        self.max_batch_rows = max_batch_rows  # cap on sequences per forward pass (None: no cap)
        self.adapters: dict[str, AdapterSpec] = {a.id: a for a in adapters}
        if self.model_id in self.adapters:
            raise ModelLoadError(f"adapter id {self.model_id!r} collides with the base model's id")
        self.cache = ResponseCache(cache_size)
        self.max_model_len = int(getattr(self.model.config, "max_position_embeddings", 0) or 2048)
        self.eos_ids = _eos_ids(self.model, self.tokenizer)
        self.device = next(self.model.parameters()).device
        # Grad mode is per thread: switch it off in the one thread that runs the model, never in the caller's.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmstack-engine",
                                            initializer=torch.set_grad_enabled, initargs=(False,))
        self._loaded_adapters: dict[str, str] = {}  # served id -> peft adapter name
        self._adapter_users: dict[str, int] = {}
        self._pending_unload: set[str] = set()
        self._default_adapter: str | None = None
        self._works: dict[str, Work] = {}
        self._schedulers: dict[str | None, _Scheduler] = {}
        self._uses_new_cache_kwarg = "cache" in _forward_params(self.model)
        self.stats = {"requests": 0, "cancelled": 0, "generated_tokens": 0, "batches": 0, "max_batch_size": 0,
                      "adapter_loads": 0, "adapter_unloads": 0, "forward_passes": 0}
        self.model.eval()
        if loaded.adapter_dir is not None:
            self._default_adapter = self._attach_adapter(loaded.adapter_dir, "default")

    @classmethod
    def from_source(cls, source: str, *, registry: Registry | None = None, adapters: Iterable[str] = (),
                    dtype: str = "float32", storage_options: dict[str, Any] | None = None,
                    **limits: Any) -> TransformersEngine:
        """Load ``source`` (registry ref or directory) and the ``adapters`` entries, then build the engine."""
        loaded = load_served_model(source, registry=registry, dtype=dtype)
        specs = resolve_adapters(adapters, registry=registry, storage_options=storage_options)
        return cls(loaded, adapters=specs, **limits)

    # ------------------------------------------------------------------ protocol

    async def models(self) -> list[ModelCard]:
        cards = [ModelCard(id=self.model_id, root=self.root, aliases=self.aliases, max_model_len=self.max_model_len)]
        cards += [ModelCard(id=a.id, root=a.source, parent=self.model_id, max_model_len=self.max_model_len)
                  for a in self.adapters.values()]
        return cards

    async def check_health(self) -> None:
        if self._executor._shutdown:  # noqa: SLF001 - the one thread that runs the model
            raise EngineError("engine is shut down", status_code=503, type="service_unavailable")

    async def abort(self, request_id: str) -> bool:
        work = self._works.get(request_id)
        if work is None:
            return False
        work.cancelled = True
        return True

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        work = self.prepare(request)
        return await self.collect(self._one(work), work)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        work = self.prepare(request)
        async for chunk in self._one(work):
            yield chunk

    async def _one(self, work: Work) -> AsyncIterator[GenerationChunk]:
        cached = self.lookup(work)
        if cached is not None:
            for chunk in replay(cached):
                yield chunk
            return
        await self.acquire_adapter(work.adapter)
        try:
            async for outputs in self.run_batch([work]):
                if isinstance(outputs[0], GenerationChunk):
                    yield outputs[0]
        finally:
            self.release_adapter(work.adapter)

    async def generate_batch(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Decode ``requests`` as one batch (they must name the same model); results in order."""
        works = [self.prepare(r) for r in requests]
        if len({w.adapter for w in works}) > 1:
            raise EngineError("one batch serves one model; split requests by model first")
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

    async def collect(self, chunks: AsyncIterator[GenerationChunk], work: Work) -> GenerationResult:
        return assemble([c async for c in chunks], work)

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
        raise not_found(model, self.served_ids())

    def prepare(self, request: GenerationRequest) -> Work:
        """Validate and tokenize ``request``; raises :class:`EngineError` naming the bad field."""
        adapter = self.adapter_for(request.model)
        params = request.sampling
        if params.n > self.max_n:
            raise EngineError(f"n must be at most {self.max_n}, got {params.n}", param="n")
        if params.max_tokens is not None and not 1 <= params.max_tokens <= self.max_tokens_limit:
            raise EngineError(f"max_tokens must be in [1, {self.max_tokens_limit}], got {params.max_tokens}",
                              param="max_tokens")
        if params.temperature < 0:
            raise EngineError(f"temperature must be >= 0, got {params.temperature}", param="temperature")
        if not 0 < params.top_p <= 1:
            raise EngineError(f"top_p must be in (0, 1], got {params.top_p}", param="top_p")
        if len(params.stop) > 4:
            raise EngineError(f"at most 4 stop sequences, got {len(params.stop)}", param="stop")
        prompt_ids = self._tokenize(request)
        if not prompt_ids:
            raise EngineError("the prompt is empty", param="prompt" if request.messages is None else "messages")
        limit = self.max_model_len
        if len(prompt_ids) >= limit:
            raise EngineError(
                f"This model's maximum context length is {limit} tokens; the prompt has {len(prompt_ids)} tokens "
                f"and at least one must remain for the completion.",
                param="prompt" if request.messages is None else "messages", code="context_length_exceeded")
        if params.max_tokens is None:
            max_tokens = min(self.default_max_tokens, limit - len(prompt_ids))
        else:
            max_tokens = params.max_tokens
            if len(prompt_ids) + max_tokens > limit:
                raise EngineError(
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
            if not getattr(self.tokenizer, "chat_template", None):
                raise EngineError(f"model {request.model!r} has no chat template; use /v1/completions",
                                  param="messages")
            try:
                text = self.tokenizer.apply_chat_template(request.messages, tokenize=False,
                                                          add_generation_prompt=True)
            except Exception as exc:  # template errors are the caller's message shape
                raise EngineError(f"cannot apply the chat template: {exc}", param="messages") from None
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if isinstance(request.prompt, list):
            vocab = self.model.config.vocab_size
            bad = [t for t in request.prompt if not 0 <= t < vocab]
            if bad:
                raise EngineError(f"token ids must be in [0, {vocab}), got {bad[:5]}", param="prompt")
            return list(request.prompt)
        return list(self.tokenizer(request.prompt or "", add_special_tokens=False)["input_ids"])

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

    # ------------------------------------------------------------------ adapters

    async def acquire_adapter(self, adapter: str | None) -> None:
        """Make sure ``adapter`` is loaded and count the caller as a user until :meth:`release_adapter`."""
        if adapter is None:
            return
        self._adapter_users[adapter] = self._adapter_users.get(adapter, 0) + 1
        self._pending_unload.discard(adapter)
        if adapter not in self._loaded_adapters:
            loop = asyncio.get_running_loop()
            try:
                await loop.run_in_executor(self._executor, self.load_adapter, adapter)
            except BaseException:
                self._adapter_users[adapter] -= 1
                raise

    def release_adapter(self, adapter: str | None) -> None:
        if adapter is None:
            return
        self._adapter_users[adapter] -= 1
        if self._adapter_users[adapter] <= 0 and adapter in self._pending_unload:
            self._executor.submit(self.unload_adapter, adapter)

    def load_adapter(self, adapter: str) -> None:
        """Load ``adapter`` into the model (runs on the engine thread)."""
        if adapter in self._loaded_adapters:
            return
        spec = self.adapters[adapter]
        try:
            name = self._attach_adapter(spec.directory(), f"a{len(self._loaded_adapters)}_{self.stats['adapter_loads']}")
        except EngineError:
            raise
        except Exception as exc:
            raise EngineError(f"cannot load adapter {adapter!r} from {spec.source}: {exc}", status_code=500,
                              type="server_error", code="adapter_load_failed") from None
        self._loaded_adapters[adapter] = name
        self.stats["adapter_loads"] += 1

    def unload_adapter(self, adapter: str) -> None:
        """Drop ``adapter``'s weights now, or as soon as its last running request ends."""
        if adapter not in self._loaded_adapters:
            return
        if self._adapter_users.get(adapter, 0) > 0:
            self._pending_unload.add(adapter)
            return
        self._pending_unload.discard(adapter)
        name = self._loaded_adapters.pop(adapter)
        peft_model = self.model
        remaining = [n for n in peft_model.peft_config if n != name]
        if remaining:
            if getattr(peft_model, "active_adapter", None) == name:
                peft_model.set_adapter(remaining[0])
            peft_model.delete_adapter(name)
        self.stats["adapter_unloads"] += 1

    def loaded_adapters(self) -> list[str]:
        return list(self._loaded_adapters)

    def _attach_adapter(self, directory: Path, name: str) -> str:
        from peft import PeftModel

        if not (directory / "adapter_config.json").is_file():
            raise ModelLoadError(f"{directory} holds no adapter_config.json: not a peft adapter")
        if isinstance(self.model, PeftModel):
            self.model.load_adapter(str(directory), adapter_name=name)
        else:
            self.model = PeftModel.from_pretrained(self.model, str(directory), adapter_name=name)
        self.model.eval()
        return name

    def _select(self, adapter: str | None) -> Any:
        """Activate ``adapter`` (None: the base) and return a context to run the forward pass in."""
        import contextlib

        from peft import PeftModel

        if not isinstance(self.model, PeftModel):
            return contextlib.nullcontext()
        name = self._loaded_adapters.get(adapter) if adapter else self._default_adapter
        if name is None:
            return self.model.disable_adapter()
        if self.model.active_adapter != name:
            self.model.set_adapter(name)
        return contextlib.nullcontext()

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
            raise EngineError("one batch serves one model; split requests by model first")
        for work in works:
            self._works[work.request.request_id] = work
            self.stats["requests"] += 1
        scheduler = self._schedulers.get(works[0].adapter)
        if scheduler is None:
            scheduler = self._schedulers[works[0].adapter] = _Scheduler(self, works[0].adapter)
        group = _Group(works)
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
        self._executor.shutdown(wait=False, cancel_futures=True)


@dataclass(eq=False)
class _Group:
    """Works admitted together (one ``@serve.batch`` call) and the queue their per-step outputs go to."""

    works: list[Work]
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    created: float = field(default_factory=time.monotonic)


# Admitting a group costs one prefill forward pass beside the decode steps, so a running batch takes
# newcomers in bunches: once they are a quarter of its size, or once the oldest has waited this long.
ADMIT_FRACTION = 0.25
ADMIT_WAIT_S = 0.03


class _Scheduler:
    """The decode loop of one adapter: new groups are prefilled and merged into the running batch.

    The loop runs on the engine thread in slices of a few steps (one thread hop per slice, not per
    token); each step's output is handed back to the event loop with ``call_soon_threadsafe``.
    Slices are short so that other adapters' loops and adapter loads get the thread in between.
    """

    SLICE_STEPS = 8
    SLICE_S = 0.05

    def __init__(self, engine: TransformersEngine, adapter: str | None) -> None:
        self.engine = engine
        self.adapter = adapter
        self.pending: list[_Group] = []  # appended on the event loop, taken on the engine thread
        self.lock = threading.Lock()
        self.groups: list[_Group] = []  # engine thread only
        self.batch: _Batch | None = None
        self.task: asyncio.Task | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def admit(self, group: _Group) -> None:
        with self.lock:
            self.pending.append(group)
        if self.task is None or self.task.done():
            self.loop = asyncio.get_running_loop()
            self.task = self.loop.create_task(self._drive())

    def _busy(self) -> bool:
        with self.lock:
            return bool(self.pending) or (self.batch is not None and bool(self.batch.rows))

    async def _drive(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._busy():
                await loop.run_in_executor(self.engine._executor, self._run_slice)
        except BaseException as exc:  # noqa: BLE001 - every waiting caller gets the error
            with self.lock:
                waiting, self.pending = self.groups + self.pending, []
            self.groups, self.batch = [], None
            for group in waiting:
                group.queue.put_nowait(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise

    def _run_slice(self) -> None:
        deadline = time.monotonic() + self.SLICE_S
        for _ in range(self.SLICE_STEPS):
            groups = self._admissible()
            if groups:
                fresh = _Batch(self.engine, self.adapter, [w for g in groups for w in g.works])
                fresh.prefill()
                if self.batch is None or not self.batch.rows:
                    self.batch = fresh
                elif fresh.rows:
                    self.batch.merge(fresh)
                self.groups += groups
            elif self.batch is not None and self.batch.rows:
                self.batch.step()
            else:
                return
            self._publish()
            if time.monotonic() > deadline:
                return

    def _admissible(self) -> list[_Group]:
        """Pending groups that fit beside the running rows (max_batch_rows); at least one if idle."""
        running = len(self.batch.rows) if self.batch is not None else 0
        if running and not self.batch.mergeable:  # type: ignore[union-attr]
            return []
        with self.lock:
            if running and self.pending:
                waiting = sum(w.request.sampling.n for g in self.pending for w in g.works)
                if waiting < ADMIT_FRACTION * running and time.monotonic() - self.pending[0].created < ADMIT_WAIT_S:
                    return []
            cap = self.engine.max_batch_rows
            taken: list[_Group] = []
            for group in self.pending:
                size = sum(w.request.sampling.n for w in group.works)
                if cap is not None and running + size > cap and (running or taken):
                    break
                taken.append(group)
                running += size
            self.pending = self.pending[len(taken):]
        return taken

    def _publish(self) -> None:
        """Send each group its works' new text; forget groups whose works have all finished."""
        now = time.time()
        live = []
        for group in self.groups:
            outputs = [StopIteration if w.reported else _chunk(self.engine, w, now) for w in group.works]
            self.loop.call_soon_threadsafe(group.queue.put_nowait, outputs)  # type: ignore[union-attr]
            if not all(w.reported for w in group.works):
                live.append(group)
        self.groups = live


class _Batch:
    """Sequences decoded together: left-padded tensors, a shared KV cache, and a row per sequence.

    Tensor row ``j`` is ``self.rows[j]``. Rows leave when they finish or their work is cancelled;
    another batch's rows join through :meth:`merge`.
    """

    def __init__(self, engine: TransformersEngine, adapter: str | None, works: list[Work]) -> None:
        import torch

        self.engine = engine
        self.adapter = adapter
        self.rows: list[_Row] = []
        for work in works:
            params = work.request.sampling
            for choice in range(params.n):
                generator = None
                if params.temperature > 0:
                    generator = torch.Generator()
                    seed = _choice_seed(params.seed, choice) if params.seed is not None else _random_seed()
                    generator.manual_seed(seed)
                work.rows.append(_Row(work, choice, params, generator, work.max_tokens, len(work.prompt_ids)))
            if not work.cancelled:
                self.rows += work.rows
        self.cache: Any = None
        self.mask: torch.Tensor | None = None  # [B, T]: 1 where a real token sits in the KV cache
        self.positions: torch.Tensor | None = None  # [B, 1]: position of each row's last token
        self.logits: torch.Tensor | None = None

    @property
    def mergeable(self) -> bool:
        return _cache_layers(self.cache) is not None

    # Each call runs on the engine thread and ends with sampling, so a token is sent as soon as it exists.

    def prefill(self) -> None:
        import torch

        now = time.time()
        for row in self.rows:
            row.work.started = now
        if not self.rows:
            return
        self.engine.stats["batches"] += 1
        width = max(row.prompt_len for row in self.rows)
        pad = self.engine.tokenizer.pad_token_id if self.engine.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(self.rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(self.rows), width), dtype=torch.long)
        for j, row in enumerate(self.rows):  # left padding: every prompt ends at the last column
            prompt = row.work.prompt_ids
            ids[j, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            mask[j, width - len(prompt):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, T]: each row counts from its first real token
        self.mask = mask
        self._forward(ids, positions, cache=None)
        self.positions = positions[:, -1:]
        self._sample()

    def step(self) -> None:
        import torch

        keep = [j for j, row in enumerate(self.rows) if row.finish_reason is None and not row.work.cancelled]
        if len(keep) < len(self.rows):
            self.rows = [self.rows[j] for j in keep]
            if not keep:
                self.cache = self.mask = self.positions = None
                return
            index = torch.tensor(keep, dtype=torch.long)
            self.cache.batch_select_indices(index.to(self.engine.device))
            self.mask, self.positions = self.mask[index], self.positions[index]
        last = torch.tensor([[row.ids[-1]] for row in self.rows], dtype=torch.long)  # [B, 1]
        self.mask = torch.cat([self.mask, torch.ones((len(self.rows), 1), dtype=torch.long)], dim=1)
        self.positions = self.positions + 1
        self._forward(last, self.positions, cache=self.cache)
        self._sample()

    def merge(self, other: _Batch) -> None:
        """Append ``other``'s rows: left-pad the shorter KV cache with masked slots, then stack."""
        import torch
        import torch.nn.functional as F

        # Drop finished rows first so the merged batch carries no dead weight.
        keep = [j for j, row in enumerate(self.rows) if row.finish_reason is None and not row.work.cancelled]
        if len(keep) < len(self.rows):
            index = torch.tensor(keep, dtype=torch.long)
            self.rows = [self.rows[j] for j in keep]
            self.cache.batch_select_indices(index.to(self.engine.device))
            self.mask, self.positions = self.mask[index], self.positions[index]
        if not self.rows:
            self.rows, self.cache, self.mask, self.positions = other.rows, other.cache, other.mask, other.positions
            return
        mine, theirs = _cache_layers(self.cache), _cache_layers(other.cache)
        width = max(self.mask.shape[1], other.mask.shape[1])
        for a, b in zip(mine, theirs):
            pad_a, pad_b = width - a.keys.shape[-2], width - b.keys.shape[-2]
            a.keys = torch.cat([F.pad(a.keys, (0, 0, pad_a, 0)), F.pad(b.keys, (0, 0, pad_b, 0))], dim=0)
            a.values = torch.cat([F.pad(a.values, (0, 0, pad_a, 0)), F.pad(b.values, (0, 0, pad_b, 0))], dim=0)
        self.mask = torch.cat([F.pad(self.mask, (width - self.mask.shape[1], 0)),
                               F.pad(other.mask, (width - other.mask.shape[1], 0))], dim=0)
        self.positions = torch.cat([self.positions, other.positions], dim=0)
        self.rows = self.rows + other.rows

    def _forward(self, ids: Any, positions: Any, *, cache: Any) -> None:
        import torch

        engine = self.engine
        device = engine.device
        kwargs: dict[str, Any] = dict(input_ids=ids.to(device), attention_mask=self.mask.to(device),
                                      position_ids=positions.to(device), use_cache=True, logits_to_keep=1)
        if cache is not None:
            kwargs["cache" if engine._uses_new_cache_kwarg else "past_key_values"] = cache
        with torch.inference_mode(), engine._select(self.adapter):  # grad mode is per thread
            out = engine.model(**kwargs)
        self.cache = getattr(out, "cache", None) or out.past_key_values
        self.logits = out.logits[:, -1, :].float().cpu()  # [B, V]
        engine.stats["max_batch_size"] = max(engine.stats["max_batch_size"], len(self.rows))
        engine.stats["forward_passes"] += 1
        for row in self.rows:
            row.work.batch_size = max(row.work.batch_size, len(self.rows))

    def _sample(self) -> None:
        now = time.time()
        engine = self.engine
        for j, row in enumerate(self.rows):
            token = _sample_token(self.logits[j], row.params, row.generator)
            row.ids.append(token)
            if row.first_token_time is None:
                row.first_token_time = now
            engine.stats["generated_tokens"] += 1
            if token in engine.eos_ids:
                row.ids.pop()
                row.finish_reason = "stop"
                row.eos = True
            elif len(row.ids) >= row.max_tokens or row.prompt_len + len(row.ids) >= engine.max_model_len:
                row.finish_reason = "length"
            row.text = engine.tokenizer.decode(row.ids, skip_special_tokens=True,
                                               clean_up_tokenization_spaces=False)
            for stop in row.params.stop:
                at = row.text.find(stop)
                if at >= 0:
                    row.text = row.text[:at]
                    row.finish_reason = "stop"


def _cache_layers(cache: Any) -> list[Any] | None:
    """The per-layer key/value holders of a dynamic KV cache, or None when merging is not supported."""
    layers = getattr(cache, "layers", None)
    if not layers or not all(type(layer).__name__ == "DynamicLayer" for layer in layers):
        return None
    return list(layers)


def _chunk(engine: TransformersEngine, work: Work, now: float) -> GenerationChunk:
    """A work's new text since its last chunk (per choice); the final one carries usage and timing."""
    rows = work.rows
    finished = work.cancelled or all(row.finish_reason is not None for row in rows)
    deltas = []
    for row in rows:
        final = finished or row.finish_reason is not None
        end = len(row.text) if final else _safe_end(row)
        reason_due = row.finish_reason is not None and not row.finish_sent
        if end > row.emitted or reason_due or len(row.ids) > row.ids_sent:
            deltas.append(ChoiceDelta(index=row.choice, text=row.text[row.emitted:end],
                                      token_ids=row.ids[row.ids_sent:],
                                      finish_reason=row.finish_reason if reason_due else None))
            row.emitted, row.ids_sent = max(row.emitted, end), len(row.ids)
            row.finish_sent = row.finish_sent or reason_due
    chunk = GenerationChunk(request_id=work.request.request_id, model=work.request.model, deltas=deltas)
    if finished:
        work.reported = True
        if work.cancelled:
            engine.stats["cancelled"] += 1
        firsts = [row.first_token_time for row in rows if row.first_token_time is not None]
        arrival = work.request.arrival_time
        chunk.finished = True
        chunk.prompt_tokens = len(work.prompt_ids)
        chunk.completion_tokens = sum(len(row.ids) + int(row.eos) for row in rows)
        chunk.timing = Timing(queue_s=max(0.0, (work.started or now) - arrival),
                              ttft_s=(min(firsts) - arrival) if firsts else None,
                              total_s=now - arrival, batch_size=work.batch_size)
        if work.cache_key is not None and not work.cancelled:
            engine.cache.put(work.cache_key, GenerationResult(
                request_id=work.request.request_id, model=work.request.model,
                choices=[ChoiceOutput(index=row.choice, text=row.text, token_ids=list(row.ids),
                                      finish_reason=row.finish_reason) for row in rows],
                prompt_tokens=chunk.prompt_tokens, completion_tokens=chunk.completion_tokens))
    return chunk


def _safe_end(row: _Row) -> int:
    """How much of ``row.text`` may be sent: hold back a partial UTF-8 character and a possible stop prefix."""
    text = row.text
    end = len(text)
    while end > row.emitted and text[end - 1] == "\ufffd":
        end -= 1
    hold = 0
    for stop in row.params.stop:
        for k in range(min(len(stop) - 1, end), 0, -1):
            if text[end - k:end] == stop[:k]:
                hold = max(hold, k)
                break
    return max(end - hold, row.emitted)


def _choice_seed(seed: int, choice: int) -> int:
    """Independent RNG streams per (seed, choice): seed 3 choice 1 must not equal seed 4 choice 0."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{choice}".encode()).digest()[:8], "little") >> 1


def _random_seed() -> int:
    return int.from_bytes(os.urandom(8), "little") >> 1


def _sample_token(logits: Any, params: SamplingParams, generator: Any) -> int:
    """Greedy for temperature 0, else temperature / top-k / top-p sampling with the row's own RNG."""
    import torch

    if params.temperature == 0 or generator is None:
        return int(torch.argmax(logits))
    scores = logits / params.temperature
    if params.top_k and params.top_k < scores.numel():
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        drop = cumulative - sorted_probs > params.top_p  # keep the smallest prefix reaching top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def assemble(chunks: list[GenerationChunk], work: Work) -> GenerationResult:
    """Fold a request's streamed chunks into its final result."""
    n = work.request.sampling.n
    texts = [""] * n
    ids: list[list[int]] = [[] for _ in range(n)]
    reasons: list[Any] = [None] * n
    for chunk in chunks:
        for delta in chunk.deltas:
            texts[delta.index] += delta.text
            ids[delta.index] += delta.token_ids
            reasons[delta.index] = delta.finish_reason or reasons[delta.index]
    last = chunks[-1] if chunks else None
    return GenerationResult(
        request_id=work.request.request_id, model=work.request.model,
        choices=[ChoiceOutput(index=i, text=texts[i], token_ids=ids[i], finish_reason=reasons[i]) for i in range(n)],
        prompt_tokens=last.prompt_tokens if last else len(work.prompt_ids),
        completion_tokens=last.completion_tokens if last else 0,
        timing=(last.timing if last and last.timing else Timing()), cached=bool(last and last.cached))


def replay(result: GenerationResult) -> list[GenerationChunk]:
    """A cached result as the one chunk a stream would end with."""
    return [GenerationChunk(request_id=result.request_id, model=result.model,
                            deltas=[ChoiceDelta(index=c.index, text=c.text, token_ids=c.token_ids,
                                                finish_reason=c.finish_reason) for c in result.choices],
                            prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                            finished=True, timing=result.timing, cached=True)]


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


def _forward_params(model: Any) -> set[str]:
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(inspect.signature(base.forward).parameters)


__all__ = ["AdapterSpec", "EngineProtocol", "LoadedModel", "ResponseCache", "TransformersEngine", "Work",
           "load_served_model", "resolve_adapters"]
