"""Choosing the next token: greedy, or temperature / top-k / top-p with each sequence's own RNG."""

from __future__ import annotations

import hashlib
import os
from typing import Any

from llmstack.serve.protocol import SamplingParams


def choice_seed(seed: int, choice: int) -> int:
    """Independent RNG streams per (seed, choice): seed 3 choice 1 must not equal seed 4 choice 0."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{choice}".encode()).digest()[:8], "little") >> 1


def random_seed() -> int:
    return int.from_bytes(os.urandom(8), "little") >> 1


def sample_token(logits: Any, params: SamplingParams, generator: Any) -> int:
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



def adjust_logits(logits: Any, params: SamplingParams, generated: list[int]) -> Any:
    """``logits`` [V] with the request's logit_bias added and its presence/frequency penalties subtracted.

    Penalties count the tokens generated so far (not the prompt), as OpenAI and vLLM do.
    """
    import torch

    if not (params.logit_bias or (generated and (params.presence_penalty or params.frequency_penalty))):
        return logits
    logits = logits.clone()
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias), dtype=torch.long)
        logits[ids] += torch.tensor(list(params.logit_bias.values()), dtype=logits.dtype)
    if generated and (params.presence_penalty or params.frequency_penalty):
        counts = torch.bincount(torch.tensor(generated, dtype=torch.long), minlength=logits.numel())[:logits.numel()]
        logits -= params.frequency_penalty * counts.to(logits.dtype) + params.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def token_logprobs(logits: Any, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """The chosen token's log-probability under ``logits`` and the ``top`` most likely tokens with theirs."""
    import torch

    logprobs = torch.log_softmax(logits.float(), dim=-1)
    best: list[tuple[int, float]] = []
    if top:
        values, ids = torch.topk(logprobs, min(top, logprobs.numel()))
        best = [(int(i), float(v)) for i, v in zip(ids, values)]
    return float(logprobs[token]), best
