"""The dtype the embedded engine serves in, and whether this CPU can run it.

``engine.dtype: auto`` is the dtype the model is stored in (its ``config.json``; an adapter: its base's),
except that float16 runs as bfloat16 on a CPU (same width, and CPUs multiply bf16, not fp16). Weights
and compute are in that dtype; the last position's logits and sampling stay float32 (:mod:`.batch`).
Quantized artifacts run in their recipe's dtype: only ``auto`` (or that same dtype) is accepted for them.

A half-precision dtype is refused at start-up on a CPU without the instructions that compute in it
(:func:`cpu_dtype_problem`), naming what it lacks and what it has: bf16 needs ``avx512_bf16`` or
``amx_bf16`` (native bf16 dot products), or at least AVX-512 (``avx512f`` + ``avx512bw``, on which oneDNN
emulates bf16 at fp32 speed); without them PyTorch falls back to scalar loops many times slower than fp32.

Example:
    >>> serving_dtype("auto", stored="float16")
    'bfloat16'
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from llmstack.errors import ModelLoadError

if TYPE_CHECKING:
    from llmstack.models import Artifact

DTYPES = ("float32", "bfloat16", "float16")
_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# per half-precision dtype: flags that compute in it natively, then the AVX-512 core set that emulates it
NATIVE_FLAGS = {"bfloat16": ("avx512_bf16", "amx_bf16", "bf16"),  # bf16: aarch64's BF16 extension
                "float16": ("avx512_fp16", "amx_fp16", "fphp")}  # fphp: aarch64's half-precision arithmetic
EMULATION_FLAGS = ("avx512f", "avx512bw")
_SHOWN_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile",
                "amx_bf16", "amx_fp16", "asimd", "sve", "bf16", "fphp")


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (``flags`` on x86, ``Features`` on ARM); empty when unknown."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            return frozenset(value.split())
    return frozenset()


def cpu_capability() -> str:
    """The vector instruction set PyTorch's CPU kernels were dispatched to (``AVX512``, ``AVX2``, ``DEFAULT``...)."""
    import torch

    return str(torch.backends.cpu.get_cpu_capability())


def canonical_dtype(dtype: str) -> str:
    """``dtype`` as ``float32`` / ``bfloat16`` / ``float16`` (``bf16``... accepted); ``auto`` stays ``auto``."""
    name = _ALIASES.get(dtype, dtype)
    if name != "auto" and name not in DTYPES:
        raise ModelLoadError(f"engine.dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return name


def serving_dtype(asked: str, *, stored: str) -> str:
    """What a model stored in ``stored`` is served in on a CPU when ``engine.dtype`` is ``asked``."""
    asked = canonical_dtype(asked)
    if asked != "auto":
        return asked
    stored = _ALIASES.get(stored, stored)
    return "bfloat16" if stored == "float16" else stored if stored in DTYPES else "float32"


def cpu_dtype_problem(dtype: str, *, flags: frozenset[str] | None = None,
                      capability: str | None = None) -> str | None:
    """Why this CPU cannot compute in ``dtype`` at a usable speed (None when it can, or when its flags are unknown).

    ``flags`` / ``capability`` default to :func:`cpu_flags` / :func:`cpu_capability` (tests pass their own).
    """
    dtype = canonical_dtype(dtype)
    if dtype not in NATIVE_FLAGS:
        return None
    flags = cpu_flags() if flags is None else flags
    if not flags:
        return None  # no /proc/cpuinfo (macOS, some containers): nothing to judge by
    native = NATIVE_FLAGS[dtype]
    if any(f in flags for f in native) or all(f in flags for f in EMULATION_FLAGS):
        return None
    capability = cpu_capability() if capability is None else capability
    has = ", ".join(f for f in _SHOWN_FLAGS if f in flags) or "none of " + ", ".join(_SHOWN_FLAGS)
    return (f"{dtype} needs {' or '.join(native[:2])} (native {dtype} arithmetic) or at least AVX-512 "
            f"({' + '.join(EMULATION_FLAGS)}, emulated); this CPU has {has} (PyTorch dispatches to {capability})")


def check_cpu_dtype(dtype: str, *, where: str = "engine.dtype") -> None:
    """Refuse ``dtype`` when this CPU lacks the instructions to compute in it.

    Raises:
        ModelLoadError: names the missing instruction set, what the CPU has, and what to set instead.
    """
    problem = cpu_dtype_problem(dtype)
    if problem:
        raise ModelLoadError(f"{where} resolves to {canonical_dtype(dtype)}, which this CPU cannot serve: {problem}; "
                             "set engine.dtype: float32")


def resolve_engine_dtype(artifact: Artifact, asked: str) -> str:
    """The dtype to load ``artifact`` in for ``engine.dtype`` ``asked``, checked against this CPU.

    Returns ``"auto"`` for quantized artifacts (their backend loads them in their recipe's dtype).

    Raises:
        ModelLoadError: an unknown dtype, a dtype the CPU lacks the instructions for, or a quantized artifact
            asked to run in another dtype than its recipe's.
    """
    from llmstack.models.artifact import RECIPE_FILE, stored_dtype

    asked = canonical_dtype(asked)
    root = artifact
    while root.kind == "adapter" and root.base is not None:
        root = root.base
    recipe_path = root.directory / RECIPE_FILE
    if root.quantize_on_load or (root.kind == "quantized" and recipe_path.is_file()):
        recipe = json.loads(recipe_path.read_text(encoding="utf-8")) if recipe_path.is_file() else {}
        recorded = _ALIASES.get(str(recipe.get("dtype", "auto")), str(recipe.get("dtype", "auto")))
        if asked not in ("auto", recorded):
            runs_in = f"its recipe's dtype ({recorded})" if recorded != "auto" else "the dtype its quantization sets"
            raise ModelLoadError(f"engine.dtype {asked} cannot apply to {root.label}: a quantized artifact runs in "
                                 f"{runs_in}; set engine.dtype: auto")
        return "auto"
    dtype = serving_dtype(asked, stored=stored_dtype(root.directory))
    check_cpu_dtype(dtype, where="engine.dtype" if asked != "auto" else f"engine.dtype auto ({root.label}'s stored "
                    "dtype)")
    return dtype


__all__ = ["DTYPES", "canonical_dtype", "check_cpu_dtype", "cpu_capability", "cpu_dtype_problem", "cpu_flags",
           "resolve_engine_dtype", "serving_dtype"]
