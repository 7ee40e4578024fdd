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
    # A resumed request's ids delivered by an earlier replica: the tail of ``prompt_ids`` (prefilled) and the
    # head of its row's ``ids`` (penalties, limits, text and usage count them); ``max_tokens`` is what is left.
    resumed_ids: list[int] = field(default_factory=list)

    @property
    def prompt_tokens(self) -> int:
        """The request's own prompt, without the ids of a resume."""
        return len(self.prompt_ids) - len(self.resumed_ids)


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

    def __post_init__(self) -> None:
        resumed = getattr(self.work, "resumed_ids", None)  # a bare Row (tests) may have no Work
        if resumed:  # continue the row an earlier replica began: its ids, their text already sent
            self.ids = list(resumed)
            self.ids_sent = len(resumed)
            self.max_tokens += len(resumed)
            self.emitted = self.work.request.resume_text_chars
            if self.params.logprobs is not None:  # aligned with ids; the resumed ones are never sent again
                self.logprobs = [(0.0, [])] * len(resumed)

