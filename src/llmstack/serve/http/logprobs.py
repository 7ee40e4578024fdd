"""Token logprobs in the two OpenAI shapes: legacy completions' parallel lists, and chat's ``content`` list."""

from __future__ import annotations

from typing import Any

from llmstack.serve.protocol import TokenLogprob


def completion_logprobs(tokens: list[TokenLogprob] | None, *, text_offset: int = 0) -> dict[str, Any] | None:
    """``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`` of /v1/completions (None: none asked)."""
    if tokens is None:
        return None
    offsets, at = [], text_offset
    for token in tokens:
        offsets.append(at)
        at += len(token.token)
    return {"tokens": [t.token for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [{alt.token: alt.logprob for alt in t.top} for t in tokens], "text_offset": offsets}


def chat_logprobs(tokens: list[TokenLogprob] | None) -> dict[str, Any] | None:
    """``{"content": [{"token", "logprob", "bytes", "top_logprobs"}]}`` of /v1/chat/completions."""
    if tokens is None:
        return None

    def entry(token: TokenLogprob) -> dict[str, Any]:
        return {"token": token.token, "logprob": token.logprob, "bytes": list(token.token.encode("utf-8", "replace"))}

    return {"content": [{**entry(t), "top_logprobs": [entry(alt) for alt in t.top]} for t in tokens]}
