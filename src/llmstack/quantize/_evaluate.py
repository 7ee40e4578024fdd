"""Built-in evaluation: held-out perplexity, bytes in memory, prefill and decode tokens/s.

All numbers for a quantized model are taken in the same process and on the same data as its
float source, so the ratios compare like with like.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

from llmstack.quantize._int8 import decoder_linear_names


def mean_nll(model: Any, blocks: Any, *, batch_size: int = 8) -> float:
    """Mean next-token negative log-likelihood (nats) over ``blocks`` [n, T]; every position but the first is predicted."""
    import torch

    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, blocks.shape[0], batch_size):
            ids = blocks[start:start + batch_size]
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
            total += float(torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"))
            count += ids[:, 1:].numel()
    return total / max(count, 1)


def perplexity(model: Any, blocks: Any, *, batch_size: int = 8) -> float:
    """exp(mean next-token NLL) over ``blocks`` [n, T]."""
    return math.exp(mean_nll(model, blocks, batch_size=batch_size))


def model_bytes(model: Any, layer_names: list[str] | None = None) -> dict[str, int]:
    """Bytes of every tensor the model holds (state_dict, shared storage counted once).

    ``quantized_layers`` sums the tensors of ``layer_names`` (default: the decoder linears), so a
    float source and its quantized version are compared over the same set of layers. bitsandbytes
    4-bit layers add their quantization state (absmax, nested absmax, code) to their state_dict;
    torchao tensors count their inner tensors.
    """
    from llmstack.quantize.torchao_backend import inner_tensors, is_torchao_tensor

    layer_names = decoder_linear_names(model) if layer_names is None else layer_names
    prefixes = tuple(f"{name}." for name in layer_names)
    seen: set[tuple[int, int]] = set()
    total = quantized = 0
    for key, tensor in model.state_dict().items():
        if is_torchao_tensor(tensor):  # a wrapper: its bytes are its inner int tensors and scales
            nbytes = sum(t.numel() * t.element_size() for t in inner_tensors(tensor).values())
            total += nbytes
            quantized += nbytes if key.startswith(prefixes) else 0
            continue
        if not hasattr(tensor, "untyped_storage"):
            continue
        nbytes = tensor.numel() * tensor.element_size()
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if ident in seen and nbytes:
            continue
        seen.add(ident)
        total += nbytes
        if key.startswith(prefixes):
            quantized += nbytes
    return {"model_bytes": total, "quantized_layer_bytes": quantized}


def speed(model: Any, *, vocab_size: int, prompt_tokens: int, new_tokens: int, repeats: int,
          seed: int = 0, warmup: bool = True) -> dict[str, float]:
    """Prefill tokens/s (one forward over the prompt) and decode tokens/s (greedy, KV cache, batch 1).

    One warm-up pass first (lazy weight packing, allocator) unless ``warmup=False``; then the
    median of ``repeats``.
    """
    import torch

    from llmstack.models.kv_cache import cache_kwarg, output_cache

    cache_kw = cache_kwarg(model)
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab_size, (1, prompt_tokens), generator=gen)
    prefill_times, decode_times = [], []
    with torch.inference_mode():
        first = 1 if warmup else 0
        for i in range(repeats + first):
            t0 = time.perf_counter()
            out = model(input_ids=prompt, use_cache=True)
            t1 = time.perf_counter()
            cache = output_cache(out)
            token = out.logits[:, -1:].argmax(-1)
            t2 = time.perf_counter()
            for _ in range(new_tokens):
                out = model(input_ids=token, use_cache=True, **{cache_kw: cache})
                cache = output_cache(out)
                token = out.logits[:, -1:].argmax(-1)
            t3 = time.perf_counter()
            if i >= first:  # the first pass is the warm-up
                prefill_times.append(t1 - t0)
                decode_times.append(t3 - t2)
    return {"prefill_tokens_per_s": prompt_tokens / statistics.median(prefill_times),
            "decode_tokens_per_s": new_tokens / statistics.median(decode_times)}


def evaluate(model: Any, *, eval_blocks: Any, config: Any, vocab_size: int,
             layer_names: list[str] | None = None) -> dict[str, float]:
    """Perplexity, bytes and speed of ``model`` as one flat dict."""
    metrics: dict[str, float] = dict(model_bytes(model, layer_names))  # before any lazy repacking
    metrics["perplexity"] = perplexity(model, eval_blocks)
    metrics.update(speed(model, vocab_size=vocab_size, prompt_tokens=config.evaluation.speed_prompt_tokens,
                         new_tokens=config.evaluation.speed_new_tokens, repeats=config.evaluation.speed_repeats))
    return metrics


RATIO_KEYS = ("perplexity", "model_bytes", "quantized_layer_bytes", "prefill_tokens_per_s", "decode_tokens_per_s")


def with_ratios(quantized: dict[str, float], source: dict[str, float]) -> dict[str, float]:
    """``quantized`` plus ``source_<key>`` and ``<key>_ratio`` (quantized / source) for each key."""
    out = dict(quantized)
    for key in RATIO_KEYS:
        if key in quantized and key in source:
            out[f"source_{key}"] = source[key]
            out[f"{key}_ratio"] = quantized[key] / source[key] if source[key] else float("nan")
    return out
