"""The compiled decode step: ``torch.compile`` of one-token forward passes over bucketed KV buffers.

A decode step reads the whole KV bucket (capacity 128, 256, ...) under an attention mask of bucket width
and writes its new column at an index tensor (:attr:`.kv.GrowingLayer.column`), so tensor shapes do not
change while sequences grow within a bucket and the step is compiled once per bucket (and once more when
the batch size first changes: dynamo then marks it dynamic). Prefill stays eager (its shapes vary).

Anything the compiled path cannot do (a compile error, a model or cache it does not support) falls back
to eager for the rest of the engine's life, with one logged warning and ``compile_fallbacks`` bumped.
Compiled artefacts go to inductor's cache under ``~/.cache/llmstack/compile`` (unless
``TORCHINDUCTOR_CACHE_DIR`` is set), so a replica's restart reuses them.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llmstack.config import kv_bucket_problem
from llmstack.errors import ConfigError

log = logging.getLogger(__name__)

SMALLEST_BUCKET = 128
CACHE_DIR = Path.home() / ".cache" / "llmstack" / "compile"
STAT_KEYS = ("compiles", "compile_fallbacks", "compile_seconds")


def default_buckets(max_model_len: int) -> tuple[int, ...]:
    """Powers of two from :data:`SMALLEST_BUCKET` up to the first that holds ``max_model_len``."""
    buckets = [SMALLEST_BUCKET]
    while buckets[-1] < max_model_len:
        buckets.append(buckets[-1] * 2)
    return tuple(buckets)


def check_buckets(buckets: Sequence[int] | None, max_model_len: int, *,
                  key: str = "engine.kv_buckets") -> tuple[int, ...]:
    """``buckets`` (or :func:`default_buckets`) checked: increasing positive ints, the largest holding
    ``max_model_len`` tokens; a :class:`ConfigError` naming ``key`` otherwise."""
    if buckets is None:
        return default_buckets(max_model_len)
    problem = kv_bucket_problem(buckets)
    if problem is None and buckets[-1] < max_model_len:
        problem = (f"the largest bucket ({buckets[-1]}) cannot hold the model's max length {max_model_len}; "
                   f"add a bucket >= {max_model_len}")
    if problem is not None:
        raise ConfigError(f"{key}: {problem}")
    return tuple(buckets)


def use_cache_dir() -> str:
    """Point inductor's artefact cache (FX graph cache) at :data:`CACHE_DIR` unless the user chose one."""
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(CACHE_DIR)
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]


class CompiledDecoder:
    """Decode steps of ``model`` compiled once per KV bucket; eager (None from :meth:`decode`) after a fallback.

    Args:
        model: the causal LM (no adapters: LoRA weights swapped in at run time are not what was compiled).
        stats: the engine's counters; ``compiles``, ``compile_fallbacks`` and ``compile_seconds`` go there.
        unsupported: why this model cannot take the compiled path (falls back at once), or None.
        freezing: inductor's freezing (weights folded as constants and prepacked for oneDNN on CPU).
    """

    def __init__(self, model: Any, *, stats: dict[str, Any], unsupported: str | None = None,
                 freezing: bool = False) -> None:
        self.model = model
        self.stats = stats
        for name in STAT_KEYS:
            stats.setdefault(name, 0)
        self.freezing = freezing
        self.active = True
        self._graphs = 0  # graphs the backend compiled (a recompilation adds at least one)
        self._compiled: Any = None
        if unsupported is not None:
            self.fall_back(unsupported)

    def fall_back(self, reason: str) -> None:
        """Decode eagerly from now on: one warning, one ``compile_fallbacks``."""
        if not self.active:
            return
        self.active = False
        self.stats["compile_fallbacks"] += 1
        log.warning("compiled decode step off, decoding eagerly: %s", reason)

    def _backend(self, graph: Any, example_inputs: list[Any]) -> Any:
        import torch
        from torch._inductor.compile_fx import compile_fx

        self._graphs += 1
        with torch._inductor.config.patch(freezing=self.freezing):
            return compile_fx(graph, example_inputs)

    def _step(self, input_ids: Any, attention_mask: Any, position_ids: Any, cache: Any) -> Any:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          cache=cache, use_cache=True, logits_to_keep=1).logits

    def decode(self, cache: Any, input_ids: Any, attention_mask: Any, position_ids: Any) -> Any | None:
        """Logits ``[B, 1, V]`` of one decode step over ``cache`` (its layers then hold the new token), or None
        when this step must run eagerly (nothing was counted as written then).

        ``attention_mask`` is ``[B, T]`` over the cache's columns plus the new token's.
        """
        import torch

        if not self.active:
            return None
        layers = list(getattr(cache, "layers", None) or ())
        if not layers or not all(type(layer).__name__ == "GrowingLayer" for layer in layers):
            self.fall_back(f"the KV cache is not bucketed GrowingLayers ({type(cache).__name__})")
            return None
        length = layers[0]._len  # noqa: SLF001 - the tokens every layer holds
        total = length + 1
        if attention_mask.shape[1] != total or any(layer._len != length for layer in layers):  # noqa: SLF001
            return None  # not a plain decode step over this cache
        for layer in layers:
            layer.reserve(total)
        width = layers[0].capacity
        dtype = self.model.get_input_embeddings().weight.dtype
        if not dtype.is_floating_point:
            dtype = torch.float32
        seen = torch.zeros((attention_mask.shape[0], width), dtype=torch.bool, device=attention_mask.device)
        seen[:, :total] = attention_mask.bool()
        mask = torch.zeros(seen.shape, dtype=dtype, device=seen.device).masked_fill_(~seen, torch.finfo(dtype).min)
        column = torch.tensor([length], dtype=torch.long, device=attention_mask.device)
        if self._compiled is None:
            use_cache_dir()
            self._compiled = torch.compile(self._step, backend=self._backend, dynamic=None)
        graphs, started = self._graphs, time.perf_counter()
        for layer in layers:
            layer.column = column
        try:
            logits = self._compiled(input_ids, mask[:, None, None, :], position_ids, cache)
        except Exception as exc:  # noqa: BLE001 - any compile or run failure: serve eagerly instead
            self.fall_back(f"{type(exc).__name__}: {exc}")
            return None
        finally:
            for layer in layers:
                layer.column = None
        if self._graphs > graphs:
            self.stats["compiles"] += 1
            self.stats["compile_seconds"] += round(time.perf_counter() - started, 3)
        for layer in layers:
            layer.advance()
        return logits


__all__ = ["CompiledDecoder", "check_buckets", "default_buckets", "use_cache_dir"]
