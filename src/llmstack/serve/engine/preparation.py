"""Request preparation shared by every engine: model ids, validation, chat template, tokenization, response cache.

An engine holds one :class:`RequestPreparer` and hands it each request before decoding, so every engine
refuses the same requests with the same OpenAI-shaped 400s and keys its response cache the same way.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

from llmstack.errors import ModelLoadError, RequestError, model_not_found
from llmstack.serve.engine.cache import ResponseCache
from llmstack.serve.engine.loading import AdapterSpec
from llmstack.serve.engine.work import Work
from llmstack.serve.protocol import GenerationRequest, GenerationResult, ModelCard, SamplingParams, Timing

MAX_STOP_SEQUENCES = 4


class RequestPreparer:
    """Turns a :class:`GenerationRequest` into a :class:`Work` (validated, tokenized, cache key set).

    Args:
        tokenizer: the served model's tokenizer (its chat template included).
        model_id: the id requests name the base model by.
        root: the pinned ref (or directory) the model was loaded from.
        identity: the model's content identity; response-cache keys are built on it.
        vocab_size: token ids in a prompt or ``logit_bias`` must lie in ``[0, vocab_size)``.
        max_model_len: prompt plus completion tokens one sequence may hold.
        adapters: the adapters served on the base, by served id (the engine may keep adding to this mapping).
        source: what the model was asked for as (an alias, like ``aliases``).
        aliases: other names a request may use for the base model.
        default_max_tokens: used when a request gives no ``max_tokens``.
        max_tokens_limit: largest ``max_tokens`` accepted.
        max_n: cap on choices per request.
        cache_size: entries of the response cache (0 disables it).
    """

    def __init__(self, tokenizer: Any, *, model_id: str, root: str, identity: str, vocab_size: int,
                 max_model_len: int, adapters: Mapping[str, AdapterSpec] | None = None, source: str | None = None,
                 aliases: Iterable[str] = (), default_max_tokens: int = 64, max_tokens_limit: int = 512,
                 max_n: int = 4, cache_size: int = 256) -> None:
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.root = root
        self.identity = identity
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.adapters: Mapping[str, AdapterSpec] = adapters if adapters is not None else {}
        if model_id in self.adapters:
            raise ModelLoadError(f"adapter id {model_id!r} collides with the base model's id")
        self.aliases = sorted({a for a in (root, source, *aliases) if a and a != model_id})
        self.default_max_tokens = default_max_tokens
        self.max_tokens_limit = max_tokens_limit
        self.max_n = max_n
        self.cache = ResponseCache(cache_size)

    # ------------------------------------------------------------------ model ids

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
        raise model_not_found(model, self.served_ids())

    def cards(self) -> list[ModelCard]:
        """The base model and its adapters as ``/v1/models`` lists them."""
        cards = [ModelCard(id=self.model_id, root=self.root, aliases=self.aliases, max_model_len=self.max_model_len)]
        cards += [ModelCard(id=a.id, root=a.source, parent=self.model_id, max_model_len=self.max_model_len)
                  for a in self.adapters.values()]
        return cards

    # ------------------------------------------------------------------ validation and tokenization

    def prepare(self, request: GenerationRequest) -> Work:
        """Validate and tokenize ``request``; raises :class:`RequestError` naming the bad field."""
        adapter = self.adapter_for(request.model)
        params = request.sampling
        self.check_sampling(params)
        prompt_ids = self.tokenize(request)
        prompt_param = "prompt" if request.messages is None else "messages"
        if not prompt_ids:
            raise RequestError("the prompt is empty", param=prompt_param)
        resumed = self.check_resume(request)
        limit = self.max_model_len
        if len(prompt_ids) >= limit:
            raise RequestError(
                f"This model's maximum context length is {limit} tokens; the prompt has {len(prompt_ids)} tokens "
                f"and at least one must remain for the completion.", param=prompt_param,
                code="context_length_exceeded")
        if params.max_tokens is None:
            max_tokens = min(self.default_max_tokens, limit - len(prompt_ids))
        else:
            max_tokens = params.max_tokens
            if len(prompt_ids) + max_tokens > limit:
                raise RequestError(
                    f"This model's maximum context length is {limit} tokens; you requested "
                    f"{len(prompt_ids) + max_tokens} tokens ({len(prompt_ids)} in the prompt, {max_tokens} for the "
                    f"completion). Reduce the prompt or max_tokens.", param="max_tokens",
                    code="context_length_exceeded")
        if resumed:  # continue after the delivered ids, which count against max_tokens
            if len(resumed) >= max_tokens:
                raise RequestError(f"resume_token_ids has {len(resumed)} ids, not fewer than the request's "
                                   f"{max_tokens} max_tokens: nothing is left to generate", param="resume_token_ids")
            prompt_ids, max_tokens = prompt_ids + resumed, max_tokens - len(resumed)
        work = Work(request, prompt_ids, max_tokens, adapter, resumed_ids=resumed)
        if params.deterministic and self.cache.capacity > 0 and not resumed:  # its result is a continuation
            adapter_identity = self.adapters[adapter].identity if adapter else None
            work.cache_key = ResponseCache.key(self.identity, adapter_identity, prompt_ids, params, max_tokens)
        return work

    def check_resume(self, request: GenerationRequest) -> list[int]:
        """The ids a resumed request continues after (checked against the vocabulary; n must be 1)."""
        resumed = list(request.resume_token_ids)
        if not resumed:
            return resumed
        if request.sampling.n != 1:
            raise RequestError(f"only a request with n=1 can be resumed, got n={request.sampling.n}",
                               param="resume_token_ids")
        bad = [t for t in resumed if not 0 <= t < self.vocab_size]
        if bad:
            raise RequestError(f"resume_token_ids must be in [0, {self.vocab_size}), got {bad[:5]}",
                               param="resume_token_ids")
        return resumed

    def check_sampling(self, params: SamplingParams) -> None:
        """Refuse sampling parameters outside the engine's limits, naming the parameter."""
        if params.n > self.max_n:
            raise RequestError(f"n must be at most {self.max_n}, got {params.n}", param="n")
        if params.max_tokens is not None and not 1 <= params.max_tokens <= self.max_tokens_limit:
            raise RequestError(f"max_tokens must be in [1, {self.max_tokens_limit}], got {params.max_tokens}",
                               param="max_tokens")
        if params.temperature < 0:
            raise RequestError(f"temperature must be >= 0, got {params.temperature}", param="temperature")
        if not 0 < params.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {params.top_p}", param="top_p")
        if len(params.stop) > MAX_STOP_SEQUENCES:
            raise RequestError(f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(params.stop)}", param="stop")
        bad = [t for t in params.logit_bias if not 0 <= t < self.vocab_size]
        if bad:
            raise RequestError(f"logit_bias token ids must be in [0, {self.vocab_size}), got {bad[:5]}",
                               param="logit_bias")

    def tokenize(self, request: GenerationRequest) -> list[int]:
        """The prompt's token ids: chat messages through the tokenizer's template, text as ``tokenizer(text)``
        gives it, token ids checked against the vocabulary."""
        if request.messages is not None:
            for i, message in enumerate(request.messages):
                check_text(message.get("content"), f"messages[{i}].content")
            if not getattr(self.tokenizer, "chat_template", None):
                raise RequestError(f"model {request.model!r} has no chat template; use /v1/completions",
                                   param="messages")
            try:  # the template places the special tokens (BOS included): none are added on top
                encoded = self.tokenizer.apply_chat_template(request.messages, tokenize=True, return_dict=True,
                                                             add_generation_prompt=True)
            except Exception as exc:  # template errors are the caller's message shape
                raise RequestError(f"cannot apply the chat template: {exc}", param="messages") from None
            return list(encoded["input_ids"])
        if isinstance(request.prompt, list):
            bad = [t for t in request.prompt if not 0 <= t < self.vocab_size]
            if bad:
                raise RequestError(f"token ids must be in [0, {self.vocab_size}), got {bad[:5]}", param="prompt")
            return list(request.prompt)
        check_text(request.prompt, "prompt")
        # Exactly what ``tokenizer(prompt)`` gives, so a tokenizer that adds BOS (Gemma, Llama) gets it, as in
        # transformers' own generate.
        return list(self.tokenizer(request.prompt or "")["input_ids"])

    # ------------------------------------------------------------------ response cache

    def lookup(self, work: Work) -> GenerationResult | None:
        """A finished result for ``work`` from the response cache, retimed for this request (None: a miss)."""
        if work.cache_key is None:
            return None
        hit = self.cache.get(work.cache_key)
        if hit is None:
            return None
        elapsed = time.time() - work.request.arrival_time
        return hit.model_copy(update={"request_id": work.request.request_id, "cached": True,
                                      "model": work.request.model,
                                      "timing": Timing(queue_s=0.0, ttft_s=elapsed, total_s=elapsed, batch_size=1)})

    def remember(self, work: Work, result: GenerationResult) -> None:
        """Keep ``work``'s finished result for later identical requests (only a cacheable, uncancelled work's)."""
        if work.cache_key is not None and not work.cancelled:
            self.cache.put(work.cache_key, result)


def check_text(text: Any, param: str) -> None:
    """Text must be valid Unicode (a lone surrogate such as "\\ud800" is not): a 400 naming the field."""
    if isinstance(text, str):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise RequestError(f"{param} is not valid Unicode text ({exc.reason} at position {exc.start})",
                               param=param, code="invalid_text") from None


def eos_token_ids(tokenizer: Any, *configs: Any) -> frozenset[int]:
    """The ids that end a sequence: each config's ``eos_token_id`` (an id or a list; a model's
    ``generation_config`` and ``config``, None skipped) and the tokenizer's."""
    ids: set[int] = set()
    for source in configs:
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)
