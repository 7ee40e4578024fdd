"""Instruction-data row formats users bring, normalized to the few shapes llmstack tokenizes.

Recognized rows, first match wins (a value of None counts as absent, as in parquet/datasets rows):

==========================  =====================================================  ==========================
format                      fields                                                 becomes
==========================  =====================================================  ==========================
chat                        ``messages``: [{role, content}] (or ShareGPT entries)  ``{"messages"}``
ShareGPT                    ``conversations``: [{from: human|gpt|system, value}]   ``{"messages"}``
TRL conversational          ``prompt`` and ``completion`` both message lists       ``{"messages"}``
TRL standard                ``prompt`` and ``completion`` strings                  ``{"prompt","completion"}``
Alpaca                      ``instruction``, ``input`` (optional), ``output``      ``{"prompt","response"}``
prompt/response             ``prompt``, ``response``, ``system`` (optional)        ``{"prompt","response"}``
plain text                  ``text``                                               ``{"text"}``
==========================  =====================================================  ==========================

Chat rows (``messages``, ``prompt``/``response``) are rendered with the chat template and only the
assistant turns are learned. TRL standard rows are plain text as in TRL: the prompt's tokens are
masked and the completion (plus the eos token) is learned, no template. Text rows are learned on
every token. ``data.columns`` renames columns first (``{prompt: question, response: answer}``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llmstack.config import INSTRUCTION_FIELDS, check_columns
from llmstack.errors import DataError

# Names data.columns may map to (the fields of the table above); the config owns the list and checks it.
CANONICAL_FIELDS = INSTRUCTION_FIELDS
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "model": "assistant", "system": "system"}
FORMATS_HINT = ("expected messages, conversations (ShareGPT), prompt/response, prompt/completion (TRL), "
                "instruction/output (Alpaca) or text")


def apply_columns(raw: Mapping[str, Any], columns: Mapping[str, str], where: str) -> dict[str, Any]:
    """``raw`` with each ``data.columns`` entry ``{canonical: column}`` renamed; DataError lists the fields found."""
    row = dict(raw)
    missing = [column for column in columns.values() if column not in raw]
    if missing:
        mapping = ", ".join(f"{k}: {v}" for k, v in columns.items())
        raise DataError(f"{where}: data.columns maps {{{mapping}}} but the row has no "
                        f"{', '.join(map(repr, missing))} (fields: {_fields(raw)}); set data.columns to the "
                        "column names this data uses")
    values = {canonical: raw[column] for canonical, column in columns.items()}
    for column in columns.values():
        row.pop(column, None)
    row.update(values)
    return row


def _fields(raw: Mapping[str, Any]) -> str:
    return ", ".join(sorted(map(str, raw))) or "none"


def _present(raw: Mapping[str, Any], key: str) -> bool:
    return raw.get(key) is not None


def normalize_row(raw: Any, where: str, columns: Mapping[str, str] | None = None) -> dict[str, Any]:
    """One raw row as ``{"messages"}``, ``{"prompt","response"[,"system"]}``, ``{"prompt","completion"}``, ``{"text"}``.

    Raises:
        DataError: naming ``where`` (file and line, or row index), for a row no format matches (listing its
            fields and the ``data.columns`` mapping to give), a missing or empty response, a bad role.
    """
    from llmstack.data.tokenizer import check_messages

    if not isinstance(raw, Mapping):
        raise DataError(f"{where}: expected an object, got {type(raw).__name__}")
    row = apply_columns(raw, columns, where) if columns else dict(raw)
    system = _text(row, "system", where, required=False)
    if _present(row, "messages"):
        messages = row["messages"]
        if _is_sharegpt(messages):
            messages = _from_sharegpt(messages, "messages", where)
        return {"messages": _with_system(check_messages(messages, where), system)}
    if _present(row, "conversations"):
        messages = _from_sharegpt(row["conversations"], "conversations", where)
        return {"messages": _with_system(check_messages(messages, where), system)}
    if _present(row, "completion"):
        return _trl_row(row, where)
    if _present(row, "instruction") and not _present(row, "prompt"):
        instruction = _text(row, "instruction", where)
        extra = _text(row, "input", where, required=False)
        prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
        out: dict[str, Any] = {"prompt": prompt, "response": _response(row, "output", where)}
        if system:
            out["system"] = system
        return out
    if _present(row, "prompt") or _present(row, "response"):
        out = {"prompt": _text(row, "prompt", where), "response": _response(row, "response", where)}
        if system:
            out["system"] = system
        return out
    if _present(row, "text"):
        text = _text(row, "text", where)
        assert text is not None
        if not text.strip():
            raise DataError(f"{where}: row has an empty 'text' (nothing to learn from)")
        return {"text": text}
    raise DataError(f"{where}: no instruction format matches this row (fields: {_fields(row)}); {FORMATS_HINT}; "
                    "name the columns with data.columns, e.g. data.columns: {prompt: <question column>, "
                    "response: <answer column>}")


def _trl_row(row: dict[str, Any], where: str) -> dict[str, Any]:
    from llmstack.data.tokenizer import check_messages

    prompt, completion = row.get("prompt"), row["completion"]
    if prompt is None:
        raise DataError(f"{where}: row has a 'completion' but no 'prompt' (fields: {_fields(row)})")
    if isinstance(prompt, str) and isinstance(completion, str):
        if not completion.strip():
            raise DataError(f"{where}: row has an empty 'completion' (a response is required to fine-tune on)")
        return {"prompt": prompt, "completion": completion}
    if isinstance(prompt, list) and isinstance(completion, list):
        return {"messages": check_messages([*prompt, *completion], where)}
    raise DataError(f"{where}: 'prompt' is a {type(prompt).__name__} and 'completion' a "
                    f"{type(completion).__name__}; TRL rows have both strings or both message lists")


def _is_sharegpt(messages: Any) -> bool:
    return (isinstance(messages, list) and bool(messages) and isinstance(messages[0], Mapping)
            and "from" in messages[0] and "role" not in messages[0])


def _from_sharegpt(turns: Any, key: str, where: str) -> list[dict[str, Any]]:
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: {key!r} must be a non-empty list of {{'from', 'value'}} objects")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, Mapping) or "from" not in turn or "value" not in turn:
            found = _fields(turn) if isinstance(turn, Mapping) else type(turn).__name__
            raise DataError(f"{where}: {key} entry {i} must be an object with 'from' and 'value' (found: {found})")
        role = SHAREGPT_ROLES.get(str(turn["from"]).lower())
        if role is None:
            raise DataError(f"{where}: {key} entry {i} is from {turn['from']!r}; allowed: "
                            f"{', '.join(SHAREGPT_ROLES)}")
        messages.append({"role": role, "content": turn["value"]})
    return messages


def _with_system(messages: list[dict[str, str]], system: str | None) -> list[dict[str, str]]:
    """Prepend a row-level ``system`` field unless the conversation has its own system message."""
    if system and not any(m["role"] == "system" for m in messages):
        return [{"role": "system", "content": system}, *messages]
    return messages


def _text(row: Mapping[str, Any], key: str, where: str, *, required: bool = True) -> str | None:
    value = row.get(key)
    if value is None:
        if required:
            raise DataError(f"{where}: row has no {key!r} (fields: {_fields(row)}); {FORMATS_HINT}")
        return None
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} is a {type(value).__name__}, expected a string")
    return value


def _response(row: Mapping[str, Any], key: str, where: str) -> str:
    if row.get(key) is None:
        raise DataError(f"{where}: row has no {key!r} (a response is required to fine-tune on; "
                        f"fields: {_fields(row)})")
    value = _text(row, key, where)
    assert value is not None
    if not value.strip():
        raise DataError(f"{where}: row has an empty {key!r} (a response is required to fine-tune on)")
    return value


__all__ = ["CANONICAL_FIELDS", "FORMATS_HINT", "SHAREGPT_ROLES", "apply_columns", "check_columns", "normalize_row"]
