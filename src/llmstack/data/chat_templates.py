"""Chat templates: named overrides, and assistant-token masking for templates without ``{% generation %}``.

Stock templates (Llama-3, Qwen2.5/ChatML, Gemma, Mistral, Phi-3, ...) do not say which tokens belong
to the assistant. :func:`mask_by_prefix` finds them by rendering the conversation one assistant turn
at a time with the tokenizer's own template: the render of the turns before turn *i* with the
generation prompt is the prompt the model sees at inference, and must tokenize to a prefix of the
whole conversation's tokens; the labels run from there through the turn's content and the
end-of-turn token after it (not the newline a template writes next). A template that rewrites
earlier turns as the chat grows (Qwen3 dropping old reasoning, say) is refused, naming the row,
because its training sequence would differ from what the model sees at inference.

Rendered text is tokenized exactly as ``apply_chat_template`` does (``add_special_tokens=False``:
the template writes the BOS itself when the model wants one, so it is never doubled; special-token
text is parsed as special tokens).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llmstack.config import CHAT_TEMPLATE_NAMES
from llmstack.data.instructions import IGNORE_INDEX
from llmstack.data.tokenizer import ASSISTANT, CHAT_TEMPLATE, END, SYSTEM, USER
from llmstack.errors import DataError

# ChatML (Qwen, SmolLM2, many fine-tunes): <|im_start|>role\ncontent<|im_end|>\n per message.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# name -> (template, the special tokens it writes, which the tokenizer must have as single tokens)
NAMED_TEMPLATES: dict[str, tuple[str, tuple[str, ...]]] = {
    "chatml": (CHATML_TEMPLATE, ("<|im_start|>", "<|im_end|>")),
    "llmstack": (CHAT_TEMPLATE, (SYSTEM, USER, ASSISTANT, END)),
}
TEMPLATE_NAMES = CHAT_TEMPLATE_NAMES  # the config checks data.chat_template against these names


def resolve_chat_template(value: str, tokenizer: Any | None = None) -> str:
    """The Jinja text for ``data.chat_template``: a known name, a path to a Jinja file, or the template itself.

    Args:
        value: ``chatml`` / ``llmstack``, a path to a Jinja file, or inline Jinja text.
        tokenizer: when given, a named template's special tokens must be in its vocabulary (a
            ChatML model must be able to emit ``<|im_end|>`` as one token to stop).

    Raises:
        DataError: an unknown name or missing file (lists the names), or a tokenizer lacking the tokens.
    """
    if value in NAMED_TEMPLATES:
        template, needed = NAMED_TEMPLATES[value]
        if tokenizer is not None:
            vocab = tokenizer.get_vocab()
            missing = [t for t in needed if t not in vocab]
            if missing:
                raise DataError(f"data.chat_template: {value!r} needs the tokens {', '.join(missing)} in the "
                                "tokenizer's vocabulary, and this tokenizer lacks them; give a Jinja file written "
                                "with the model's own special tokens")
        return template
    if "{{" in value or "{%" in value:
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise DataError(f"data.chat_template: {value!r} is neither a known template ({', '.join(TEMPLATE_NAMES)}) "
                        "nor an existing Jinja file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"data.chat_template: cannot read {value}: {exc}") from None
    if not text.strip():
        raise DataError(f"data.chat_template: {value} is empty")
    return text


def no_template_error() -> DataError:
    return DataError("the tokenizer has no chat template to render conversations with; set data.chat_template "
                     f"to a known name ({', '.join(TEMPLATE_NAMES)}) or a path to a Jinja file, or give plain "
                     "'text' or 'prompt'/'completion' rows, which need no template")


def has_generation_markers(template: str) -> bool:
    compact = template.replace("{%-", "{%").replace(" ", "")
    return "{%generation%}" in compact


def _preview(conv: list[dict[str, str]]) -> str:
    text = next((m["content"] for m in conv if m["role"] == "user"), conv[0]["content"])
    text = " ".join(text.split())
    return repr(text[:60] + ("..." if len(text) > 60 else ""))


def refused(index: int, conv: list[dict[str, str]], exc: Exception) -> DataError:
    """The error for a conversation the template raised on (its raise_exception message, or the bug)."""
    message = str(exc).strip() or type(exc).__name__
    return DataError(f"row {index} ({_preview(conv)}): the chat template refused the conversation "
                     f"(roles {', '.join(m['role'] for m in conv)}): {message}")


def render_chat(tokenizer: Any, template: str, messages: list[dict[str, str]], *, generation_prompt: bool,
                index: int, conv: list[dict[str, str]]) -> str:
    """``messages`` (``conv`` or a prefix of it) rendered as text; a template error names row ``index``."""
    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except Exception as exc:  # jinja2.TemplateError from raise_exception(), or a template bug
        raise refused(index, conv, exc) from None


def _special_ids(tokenizer: Any) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for token_id, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(added, "special", False):
            ids.add(int(token_id))
    return ids


def mask_by_prefix(conversations: list[list[dict[str, str]]], tokenizer: Any, template: str, *,
                   row_numbers: Sequence[int] | None = None) -> list[tuple[list[int], list[int]]]:
    """``(input_ids, labels)`` per conversation, labels on each assistant turn's content and end-of-turn token.

    ``input_ids`` equal ``apply_chat_template(conversation, tokenize=True)``. For assistant turn *i*:
    the render of the turns before it with the generation prompt must tokenize to a prefix of the
    conversation's tokens (it is the prompt at inference) and the labels start there; the render up
    to turn *i* must be a prefix of the whole text, less at most what the template writes once at
    the end of every conversation (Phi-3's closing eos). The labels end after the turn's content
    and the special token right after it (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``,
    ``</s>``); a template that changes the content labels up to its last special token instead.

    Where the tokenizer joins the prompt's last characters with the answer's first into one token,
    the labels start at the next token and a warning counts the turns.

    Args:
        row_numbers: the row index to name in errors for each conversation (default: its position).

    Raises:
        DataError: naming the row index (and its first user message) when the template refuses the
            conversation or rewrites an earlier turn.
    """
    numbers = list(row_numbers) if row_numbers is not None else list(range(len(conversations)))
    # Render everything first (per row, so a template error names its row), then tokenize in two batches.
    fulls: list[str] = []
    prompts: list[str] = []
    # per row: (turn, prompt index, end char, content end char or None)
    plans: list[list[tuple[int, int, int, int | None]]] = []
    for position, conv in enumerate(conversations):
        index = numbers[position]
        full = render_chat(tokenizer, template, conv, generation_prompt=False, index=index, conv=conv)
        fulls.append(full)
        turns: list[tuple[int, int, int, int | None]] = []
        for turn, message in enumerate(conv):
            if message["role"] != "assistant":
                continue
            if turn == 0:
                raise DataError(f"row {index} ({_preview(conv)}): the conversation starts with an assistant turn; "
                                "a chat template needs a user (or system) message before it")
            before = render_chat(tokenizer, template, conv[:turn], generation_prompt=True, index=index, conv=conv)
            after = render_chat(tokenizer, template, conv[: turn + 1], generation_prompt=False, index=index, conv=conv)
            if not full.startswith(before):
                raise DataError(
                    f"row {index} ({_preview(conv)}): the chat template's generation prompt before assistant "
                    f"turn {turn} is not how that turn starts in the whole conversation, so the training tokens "
                    "would not be what the model sees at inference; use a template that renders it the same "
                    "(data.chat_template) or set data.train_on_inputs=true")
            end = _shared_prefix(full, after)
            if end < len(before) or not full.endswith(after[end:]):
                raise DataError(
                    f"row {index} ({_preview(conv)}): the chat template rewrites earlier turns: the conversation "
                    f"up to assistant turn {turn} renders differently inside the whole conversation, so the "
                    "training tokens would not be what the model sees at inference; split the conversation into "
                    "one row per assistant turn, use a template that keeps history unchanged "
                    "(data.chat_template), or set data.train_on_inputs=true")
            content = message["content"].strip()
            found = full.rfind(content, len(before), end) if content else -1
            prompts.append(before)
            turns.append((turn, len(prompts) - 1, end, found + len(content) if found >= 0 else None))
        plans.append(turns)
    if not fulls:
        return []
    encoded = tokenizer(fulls, add_special_tokens=False, return_offsets_mapping=True)
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"] if prompts else []
    special = _special_ids(tokenizer)
    merged: list[int] = []
    examples: list[tuple[list[int], list[int]]] = []
    for position, turns in enumerate(plans):
        input_ids = list(encoded["input_ids"][position])
        offsets = encoded["offset_mapping"][position]
        labels = [IGNORE_INDEX] * len(input_ids)
        for turn, prompt_at, end_char, content_end in turns:
            start = len(prompt_ids[prompt_at])
            if list(prompt_ids[prompt_at]) != input_ids[:start]:
                # The text is a prefix but the tokenizer joins the prompt's last characters with the answer's
                # first (an answer opening with whitespace, say): learn from the first token wholly after it.
                start = _first_at_or_after(offsets, len(prompts[prompt_at]), 0)
                merged.append(numbers[position])
            if content_end is not None:  # the content, then the end-of-turn token right after it
                stop = _first_at_or_after(offsets, content_end, start)
                if stop < len(input_ids) and input_ids[stop] in special:
                    stop += 1
            else:
                stop = _drop_trailing_separator(input_ids, start, _first_at_or_after(offsets, end_char, start),
                                                special, tokenizer)
            labels[start:stop] = input_ids[start:stop]
        examples.append((input_ids, labels))
    if merged:
        rows = sorted(set(merged))
        warnings.warn(f"{len(merged)} assistant turns (rows {', '.join(map(str, rows[:10]))}"
                      f"{', ...' if len(rows) > 10 else ''}) begin with text the tokenizer joins to the prompt's "
                      "last token, so their first token differs from what the model sees at inference; their "
                      "labels start at the first token after the prompt (strip leading whitespace from answers "
                      "to avoid it)", stacklevel=3)
    return examples


def _shared_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    low, high = 0, n  # a[:low] == b[:low], a[:high] != b[:high]
    while high - low > 1:
        mid = (low + high) // 2
        if a[:mid] == b[:mid]:
            low = mid
        else:
            high = mid
    return low


def _first_at_or_after(offsets: Any, char: int, start: int) -> int:
    """Index of the first token (from ``start``) that begins at or after character ``char``."""
    for i in range(start, len(offsets)):
        if offsets[i][0] >= char:
            return i
    return len(offsets)


def _drop_trailing_separator(input_ids: list[int], start: int, end: int, special: set[int], tokenizer: Any) -> int:
    """End of the span without the whitespace a template writes after the end-of-turn token."""
    last_special = next((i for i in range(end - 1, start - 1, -1) if input_ids[i] in special), None)
    if last_special is None:
        return end
    tail = input_ids[last_special + 1: end]
    if tail and not tokenizer.decode(tail).strip():
        return last_special + 1
    return end
