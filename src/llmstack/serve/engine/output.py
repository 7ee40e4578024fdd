"""From decoded rows to what callers see: streamed chunks, the final result, a cached result replayed."""

from __future__ import annotations

from typing import Any

from llmstack.serve.protocol import ChoiceDelta, ChoiceOutput, GenerationChunk, GenerationResult, Timing, TokenLogprob
from llmstack.serve.engine.work import Row, Work


def chunk_of(tokenizer: Any, work: Work, now: float) -> GenerationChunk:
    """A work's new text since its last chunk (per choice); the final one carries usage and timing and marks
    the work ``reported``."""
    rows = work.rows
    finished = work.cancelled or all(row.finish_reason is not None for row in rows)
    deltas = []
    for row in rows:
        final = finished or row.finish_reason is not None
        end = len(row.text) if final else safe_end(row)
        reason_due = row.finish_reason is not None and not row.finish_sent
        if end > row.emitted or reason_due or len(row.ids) > row.ids_sent:
            deltas.append(ChoiceDelta(index=row.choice, text=row.text[row.emitted:end],
                                      token_ids=row.ids[row.ids_sent:],
                                      finish_reason=row.finish_reason if reason_due else None,
                                      logprobs=logprobs_of(tokenizer, row, row.ids_sent)))
            row.emitted, row.ids_sent = max(row.emitted, end), len(row.ids)
            row.finish_sent = row.finish_sent or reason_due
    chunk = GenerationChunk(request_id=work.request.request_id, model=work.request.model, deltas=deltas)
    if finished:
        work.reported = True
        firsts = [row.first_token_time for row in rows if row.first_token_time is not None]
        arrival = work.request.arrival_time
        chunk.finished = True
        chunk.prompt_tokens = work.prompt_tokens
        chunk.prefix_cached_tokens = work.prefix_cached_tokens
        chunk.completion_tokens = sum(len(row.ids) + int(row.eos) for row in rows)
        chunk.timing = Timing(queue_s=max(0.0, (work.started or now) - arrival),
                              ttft_s=(min(firsts) - arrival) if firsts else None,
                              total_s=now - arrival, batch_size=work.batch_size)
    return chunk


def logprobs_of(tokenizer: Any, row: Row, start: int) -> list[TokenLogprob] | None:
    """The row's token logprobs from token ``start`` on (None when the request asked for none)."""
    if row.params.logprobs is None:
        return None

    def piece(token_id: int) -> str:
        return tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    return [TokenLogprob(token=piece(token_id), token_id=token_id, logprob=logprob,
                         top=[TokenLogprob(token=piece(i), token_id=i, logprob=lp) for i, lp in best])
            for token_id, (logprob, best) in zip(row.ids[start:], row.logprobs[start:])]


MAX_UNSETTLED_IDS = 16  # a UTF-8 character spans at most 4 bytes, hence at most 4 ids
CONTEXT_IDS = 4  # settled ids decoded again in front of the new ones


def extend_text(tokenizer: Any, row: Row) -> None:
    """Bring ``row.text`` up to date with ``row.ids``, decoding only the ids since the last settled point.

    Incremental detokenization: ``ids[prefix_at:read_at]`` (a few settled ids) are decoded again only as
    context, so that a tokenizer that treats a leading piece specially decodes the new ids as it would
    inside the whole text; the new text is what decoding them adds. A decode ending in U+FFFD (a
    character split over tokens) stays unsettled and is decoded again with the next id; after
    ``MAX_UNSETTLED_IDS`` such ids (a run of undecodable bytes, not a split character) it settles as it is,
    so the window, and the cost of a step, stays bounded.
    """

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    context = decode(row.ids[row.prefix_at:row.read_at]) if row.read_at > row.prefix_at else ""
    window = decode(row.ids[row.prefix_at:])
    if not window.startswith(context):  # the tokenizer merged across the boundary: decode everything once
        row.settled, row.prefix_at, row.read_at, context = "", 0, 0, ""
        window = decode(row.ids)
    new = window[len(context):]
    row.text = row.settled + new
    # An id that adds nothing (a skipped special token) settles too.
    if not new.endswith("\ufffd") or len(row.ids) - row.read_at > MAX_UNSETTLED_IDS:
        row.settled, row.prefix_at, row.read_at = row.text, max(row.read_at, len(row.ids) - CONTEXT_IDS), len(row.ids)


def safe_end(row: Row) -> int:
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


def assemble(chunks: list[GenerationChunk], work: Work) -> GenerationResult:
    """Fold a request's streamed chunks into its final result."""
    n = work.request.sampling.n
    texts = [""] * n
    ids: list[list[int]] = [[] for _ in range(n)]
    reasons: list[Any] = [None] * n
    logprobs: list[list[TokenLogprob] | None] = [None] * n
    for chunk in chunks:
        for delta in chunk.deltas:
            texts[delta.index] += delta.text
            ids[delta.index] += delta.token_ids
            reasons[delta.index] = delta.finish_reason or reasons[delta.index]
            if delta.logprobs is not None:
                logprobs[delta.index] = (logprobs[delta.index] or []) + delta.logprobs
    last = chunks[-1] if chunks else None
    return GenerationResult(
        request_id=work.request.request_id, model=work.request.model,
        choices=[ChoiceOutput(index=i, text=texts[i], token_ids=ids[i], finish_reason=reasons[i], logprobs=logprobs[i])
                 for i in range(n)],
        prompt_tokens=last.prompt_tokens if last else work.prompt_tokens,
        completion_tokens=last.completion_tokens if last else 0,
        timing=(last.timing if last and last.timing else Timing()), cached=bool(last and last.cached),
        prefix_cached_tokens=last.prefix_cached_tokens if last else None)


def replay(result: GenerationResult) -> list[GenerationChunk]:
    """A cached result as the one chunk a stream would end with."""
    return [GenerationChunk(request_id=result.request_id, model=result.model,
                            deltas=[ChoiceDelta(index=c.index, text=c.text, token_ids=c.token_ids,
                                                finish_reason=c.finish_reason, logprobs=c.logprobs)
                                    for c in result.choices],
                            prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                            finished=True, timing=result.timing, cached=True)]

