"""Request and response models: the OpenAI wire format and the engine's internal types, in one file.

The HTTP layer (``http/``) speaks the OpenAI models below; the engine (``engine/``) speaks
:class:`GenerationRequest` / :class:`GenerationResult` / :class:`GenerationChunk`. Errors are
:class:`~llmstack.errors.RequestError` (any ``LLMStackError``), which maps one-to-one onto the OpenAI
nested error shape ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from llmstack.errors import RequestError

# Errors: the one family of llmstack.errors. A refused request is a RequestError (kept importable here as
# EngineError); it carries its HTTP status and OpenAI fields and pickles intact across Ray handles.
EngineError = RequestError


# --------------------------------------------------------------------------- engine types


class SamplingParams(BaseModel):
    """Per-request decoding settings. ``temperature == 0`` is greedy decoding."""

    max_tokens: int | None = None  # None: the server default, clipped to the context window
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    seed: int | None = None  # per-request RNG: the same seed gives the same sample, batched or alone
    stop: list[str] = Field(default_factory=list)  # generation ends before the first of these strings
    n: int = 1  # independent choices for this prompt
    presence_penalty: float = 0.0  # subtracted from the logit of every token generated at least once
    frequency_penalty: float = 0.0  # subtracted once per earlier occurrence in the generated tokens
    logit_bias: dict[int, float] = Field(default_factory=dict)  # token id -> added to its logit
    logprobs: int | None = None  # None: no logprobs; k: each token's logprob and the k most likely alternatives
    min_tokens: int = 0  # end-of-sequence is not sampled before this many tokens
    ignore_eos: bool = False  # never end on end-of-sequence (load tests: exactly max_tokens tokens)

    @property
    def deterministic(self) -> bool:
        return self.temperature == 0 or self.seed is not None


class GenerationRequest(BaseModel):
    """One prompt (text, token ids or chat messages) and how to continue it."""

    model: str  # served model id: the base model's name or an adapter's name
    prompt: str | list[int] | None = None
    messages: list[dict[str, Any]] | None = None  # chat: rendered with the tokenizer's chat template
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    request_id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    arrival_time: float = Field(default_factory=time.time)
    # A resumed request (its first replica died): the ids already delivered and the characters of text they
    # showed. The engine continues after the tokenized prompt plus these ids; they count against ``max_tokens``
    # and in ``completion_tokens``, and text held back for them (a split character) is sent first (n must be 1).
    resume_token_ids: list[int] = Field(default_factory=list)
    resume_text_chars: int = Field(default=0, ge=0)


class TokenLogprob(BaseModel):
    """A generated token's log-probability (after logit_bias and penalties), and its top alternatives."""

    token: str
    token_id: int
    logprob: float
    top: list[TokenLogprob] = Field(default_factory=list)


class ChoiceOutput(BaseModel):
    index: int
    text: str
    token_ids: list[int]
    finish_reason: Literal["stop", "length"] | None
    logprobs: list[TokenLogprob] | None = None


class Timing(BaseModel):
    """Where the time of one request went, measured inside the engine."""

    queue_s: float = 0.0  # arrival to the start of its batch's prefill
    ttft_s: float | None = None  # arrival to its first generated token
    total_s: float = 0.0  # arrival to its last token
    batch_size: int = 1  # sequences decoded together in its batch


class GenerationResult(BaseModel):
    request_id: str
    model: str
    choices: list[ChoiceOutput]
    prompt_tokens: int
    completion_tokens: int
    timing: Timing = Field(default_factory=Timing)
    cached: bool = False  # served from the response cache
    prefix_cached_tokens: int | None = None  # prompt tokens reused from the prefix cache (None: cache off)
    resumed: int = 0  # times the request was resumed on another replica after one died


class ChoiceDelta(BaseModel):
    index: int
    text: str
    token_ids: list[int] = Field(default_factory=list)
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: list[TokenLogprob] | None = None


class GenerationChunk(BaseModel):
    """One streaming step: new text per choice; the last chunk carries usage and timing."""

    request_id: str
    model: str
    deltas: list[ChoiceDelta]
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finished: bool = False
    timing: Timing | None = None
    cached: bool = False
    prefix_cached_tokens: int | None = None  # on the last chunk: prompt tokens reused from the prefix cache
    resumed: int = 0  # on the last chunk: times the stream was resumed on another replica after one died


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "llmstack"
    root: str | None = None  # the registry ref (name@vN) or path it was loaded from
    parent: str | None = None  # adapters: the served base model
    aliases: list[str] = Field(default_factory=list)  # other names that select it (e.g. name@production)
    max_model_len: int | None = None


# --------------------------------------------------------------------------- OpenAI requests


# Fields clients send that change nothing about the answer: accepted. Any other field this server does not
# implement is refused with a 400 naming it, never dropped with a 200.
IGNORED_FIELDS = frozenset({"user", "metadata", "store", "service_tier"})


class _OpenAIRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = Field(default=None, description="Served model id; defaults to the base model.")
    max_tokens: int | None = Field(strict=True, default=None, ge=1, description="Tokens to generate (at most the server limit).")
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(strict=True, default=0, ge=0)
    n: int = Field(strict=True, default=1, ge=1)
    stop: str | list[str] | None = Field(default=None)
    seed: int | None = Field(strict=True, default=None, ge=0, le=2**63 - 1)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = Field(default=None, description="Token id (as a string) -> bias in [-100, 100].")
    response_format: dict[str, Any] | None = Field(default=None, description='Only {"type": "text"} is served.')
    min_tokens: int = Field(strict=True, default=0, ge=0, description="No end-of-sequence before this many tokens (vLLM's).")
    ignore_eos: bool = Field(default=False, description="Generate max_tokens tokens regardless of EOS (vLLM's).")
    stream: bool = False
    stream_options: dict[str, Any] | None = None

    @field_validator("stop")
    @classmethod
    def _stop_is_unicode(cls, stop: str | list[str] | None) -> str | list[str] | None:
        for text in [stop] if isinstance(stop, str) else stop or []:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("stop strings must be valid Unicode (a lone surrogate cannot match any output)") from None
        return stop

    def sampling(self, *, max_tokens: int | None = None, logprobs: int | None = None) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(max_tokens=self.max_tokens if max_tokens is None else max_tokens,
                              temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              seed=self.seed, stop=[s for s in stop if s], n=self.n,
                              presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                              logit_bias=self._logit_bias(), logprobs=logprobs, min_tokens=self.min_tokens,
                              ignore_eos=self.ignore_eos)

    def _logit_bias(self) -> dict[int, float]:
        bias: dict[int, float] = {}
        for key, value in (self.logit_bias or {}).items():
            if not str(key).isdigit():
                raise RequestError(f"logit_bias keys must be token ids, got {key!r}", param="logit_bias")
            if not -100 <= value <= 100:
                raise RequestError(f"logit_bias values must be in [-100, 100], got {value} for {key}",
                                   param="logit_bias")
            bias[int(key)] = float(value)
        return bias

    def refuse_unsupported(self) -> None:
        """Raise a 400 naming the first parameter this server cannot honour."""
        problems = self._unsupported()
        if (self.response_format or {}).get("type", "text") != "text":
            problems.append(("response_format", f"response_format type {self.response_format.get('type')!r} is not "
                                                "supported (only 'text')"))
        for name in sorted(set(self.model_extra or {}) - IGNORED_FIELDS):
            if name not in {p for p, _ in problems}:
                problems.append((name, f"unsupported parameter {name!r}"))
        if problems:
            param, message = problems[0]
            raise RequestError(message + "; see GET /docs for what this server implements", param=param,
                               code="unsupported_parameter")

    def _unsupported(self) -> list[tuple[str, str]]:
        return []


class CompletionRequest(_OpenAIRequest):
    """``POST /v1/completions``."""

    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="Text, a list of texts, token ids, or a list of token-id lists.")
    echo: bool = False
    logprobs: int | None = Field(strict=True, default=None, ge=0, le=5, description="Logprobs of each token and the top-k.")
    suffix: str | None = None
    best_of: int | None = Field(strict=True, default=None, ge=1)

    def _unsupported(self) -> list[tuple[str, str]]:
        problems = []
        if self.suffix:
            problems.append(("suffix", "suffix (insertion) is not supported"))
        if self.best_of is not None and self.best_of != self.n:
            problems.append(("best_of", f"best_of other than n is not supported (n={self.n}, best_of={self.best_of})"))
        return problems


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: keep the text ones
            return "".join(str(part.get("text", "")) for part in self.content if part.get("type") == "text")
        return self.content or ""


class ChatCompletionRequest(_OpenAIRequest):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(strict=True, default=None, ge=1, description="Replaces max_tokens for chat.")
    logprobs: bool = False
    top_logprobs: int | None = Field(strict=True, default=None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None

    def _unsupported(self) -> list[tuple[str, str]]:
        problems = []
        if self.tools:
            problems.append(("tools", "tool calling is not supported by this server"))
        if self.tool_choice not in (None, "none"):
            problems.append(("tool_choice", "tool calling is not supported by this server"))
        if self.top_logprobs is not None and not self.logprobs:
            problems.append(("top_logprobs", "top_logprobs needs logprobs: true"))
        return problems

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# --------------------------------------------------------------------------- OpenAI responses


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None  # None when the prefix cache is off

    @classmethod
    def of(cls, results: list[Any]) -> Usage:
        """Summed usage of results or final chunks (``prompt_tokens``, ``completion_tokens``, ``prefix_cached_tokens``)."""
        prompt = sum(r.prompt_tokens for r in results)
        completion = sum(r.completion_tokens for r in results)
        cached = [r.prefix_cached_tokens for r in results if r.prefix_cached_tokens is not None]
        details = PromptTokensDetails(cached_tokens=sum(cached)) if cached else None
        return cls(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                   prompt_tokens_details=details)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatChoiceMessage
    finish_reason: str | None
    logprobs: dict[str, Any] | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


__all__ = [
    "ChatCompletionRequest", "ChatCompletionResponse", "ChatMessage", "ChoiceDelta", "ChoiceOutput",
    "CompletionRequest", "CompletionResponse", "EngineError", "ErrorResponse", "GenerationChunk",
    "GenerationRequest", "GenerationResult", "ModelCard", "ModelList", "SamplingParams", "Timing", "TokenLogprob",
    "Usage",
]
