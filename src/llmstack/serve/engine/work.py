"""Work items: a validated request (:class:`Work`) and its sequences inside a batch (:class:`Row`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llmstack.serve.protocol import GenerationRequest, SamplingParams


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
    rows: list[Row] = field(default_factory=list)
    reported: bool = False  # its last chunk went out
    batch_size: int = 0  # most sequences decoded together with it
    prefix_cached_tokens: int | None = None  # prompt tokens whose KV came from the prefix cache (None: not asked)


@dataclass(eq=False)
class Row:
    """One sequence (one choice of one request) inside a running batch."""

    work: Work
    choice: int
    params: SamplingParams
    generator: Any  # torch.Generator or None (greedy)
    max_tokens: int
    prompt_len: int
    ids: list[int] = field(default_factory=list)
    text: str = ""  # decoded ids: ``settled`` plus the decode of the ids from ``read_at`` on
    settled: str = ""  # text of ids[:read_at]; never changes once decoded
    prefix_at: int = 0  # incremental detokenization: ids[prefix_at:read_at] decode as context for the new ids
    read_at: int = 0
    searched: int = 0  # characters of text already searched for stop strings (and settled)
    emitted: int = 0  # characters of text already sent
    finish_reason: str | None = None
    finish_sent: bool = False
    ids_sent: int = 0
    eos: bool = False  # ended on an end-of-sequence token (counted, not shown)
    first_token_time: float | None = None
    logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)  # per id, when asked

