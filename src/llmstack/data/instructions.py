"""Instruction data: load prompt/response or chat rows, apply the chat template, mask the prompt.

Accepted rows (jsonl lines, parquet rows or ``datasets`` rows):

* ``{"prompt": str, "response": str}`` with an optional ``"system": str``;
* ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`` with at least one
  non-empty assistant message;
* Alpaca style ``{"instruction": str, "input": str (optional), "output": str}`` (becomes prompt/response).

``builtin:stdlib-qa`` gives the built-in question/answer pairs. Labels are ``-100`` everywhere
except on assistant content and the ``<|eos|>`` that closes each assistant turn.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from llmstack.errors import DataError

IGNORE_INDEX = -100
SPLITS = ("train", "eval", "all")


def load_instructions(source: str, *, split: str | None = None, max_rows: int | None = None,
                      storage_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Load and validate instruction rows.

    Args:
        source: ``builtin:stdlib-qa``, or a path/URL/glob of ``.jsonl`` (also ``.parquet`` or a
            ``datasets.save_to_disk`` directory) holding prompt/response or chat rows.
        split: ``"train"``, ``"eval"`` or ``"all"``. None means ``"train"`` for the builtin and
            ``"all"`` for files. For files, train/eval is a deterministic ~5% hold-out keyed on the
            row's prompt text, so the same row always lands in the same split.
        max_rows: keep only the first N rows of the split.
        storage_options: fsspec options for remote URLs.

    Returns:
        Rows ``{"prompt", "response"[, "system"]}`` or ``{"messages": [...]}``.

    Raises:
        DataError: missing/empty file, invalid JSON, a row without a response or with an unknown
            role; the message names the file and line.

    Example:
        >>> rows = load_instructions("builtin:stdlib-qa", split="eval")
        >>> sorted(rows[0])
        ['prompt', 'response']
    """
    if split is not None and split not in SPLITS:
        raise DataError(f"split must be one of {', '.join(SPLITS)} or None, got {split!r}")
    if source.startswith("builtin:"):
        if source != "builtin:stdlib-qa":
            raise DataError(f"unknown builtin instruction dataset {source!r}; known: builtin:stdlib-qa")
        from llmstack.data.builtin import stdlib_qa_rows

        split = split or "train"
        rows: list[dict[str, Any]] = stdlib_qa_rows(None if split == "all" else split)
    else:
        rows = [_normalize(raw, where) for where, raw in _iter_rows(source, storage_options or {})]
        if not rows:
            raise DataError(f"{source}: no instruction rows")
        if split in ("train", "eval"):
            from llmstack.data.builtin import qa_split

            rows = [row for row in rows if qa_split(_row_key(row)) == split]
    if max_rows is not None:
        rows = rows[:max_rows]
    if not rows:
        raise DataError(f"{source}: the {split!r} split is empty")
    return rows


def _iter_rows(source: str, storage_options: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """``(location, raw row)`` pairs; location is ``file:line`` (jsonl) or ``file: row i``."""
    from llmstack.data.corpus import (_display, _kind, _read_bytes, decode_utf8, iter_jsonl, load_saved_dataset,
                                      resolve_files)

    fs, paths, is_dataset = resolve_files(source, storage_options)
    if is_dataset:
        loaded = load_saved_dataset(source, storage_options=storage_options)
        for index, row in enumerate(loaded):
            yield f"{source}: row {index}", row
        return
    for path in paths:
        name = source if paths == [fs._strip_protocol(source)] else _display(fs, path)
        fmt, compression = _kind(path)
        if fmt == "jsonl":
            text = decode_utf8(_read_bytes(fs, path, name, compression), name)
            if not text.strip():
                raise DataError(f"{name}: the file is empty")
            for number, row in iter_jsonl(text, name):
                yield f"{name}:{number}: line {number}", row
        elif fmt == "parquet":
            import pyarrow.parquet as pq

            try:
                with fs.open(path, "rb") as handle:
                    table = pq.read_table(handle)
            except Exception as exc:
                raise DataError(f"{name}: not a readable parquet file ({type(exc).__name__}: {exc})") from None
            for index, row in enumerate(table.to_pylist()):
                yield f"{name}: row {index}", row
        else:
            raise DataError(f"{name}: instruction data must be .jsonl or .parquet (or a datasets directory)")


def _text(row: dict[str, Any], key: str, where: str, *, required: bool = True) -> str | None:
    value = row.get(key)
    if value is None:
        if required:
            raise DataError(f"{where}: row has no {key!r} (fields: {', '.join(sorted(row)) or 'none'}); "
                            "expected prompt/response, messages, or instruction/output")
        return None
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} is a {type(value).__name__}, expected a string")
    return value


def _normalize(raw: Any, where: str) -> dict[str, Any]:
    from llmstack.data.tokenizer import check_messages

    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected an object, got {type(raw).__name__}")
    if raw.get("messages") is not None:
        return {"messages": check_messages(raw["messages"], where)}
    if "instruction" in raw and "prompt" not in raw:
        instruction = _text(raw, "instruction", where)
        extra = _text(raw, "input", where, required=False)
        prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
        response = _response(raw, "output", where)
        return {"prompt": prompt, "response": response}
    if "prompt" not in raw and "response" not in raw:
        raise DataError(f"{where}: row has neither 'prompt'/'response' nor 'messages' "
                        f"(fields: {', '.join(sorted(raw)) or 'none'})")
    prompt = _text(raw, "prompt", where)
    row: dict[str, Any] = {"prompt": prompt, "response": _response(raw, "response", where)}
    system = _text(raw, "system", where, required=False)
    if system:
        row["system"] = system
    return row


def _response(raw: dict[str, Any], key: str, where: str) -> str:
    if key not in raw or raw[key] is None:
        raise DataError(f"{where}: row has no {key!r} (a response is required to fine-tune on)")
    value = _text(raw, key, where)
    assert value is not None
    if not value.strip():
        raise DataError(f"{where}: row has an empty {key!r} (a response is required to fine-tune on)")
    return value


def _row_key(row: dict[str, Any]) -> str:
    if "messages" in row:
        first_user = next((m["content"] for m in row["messages"] if m["role"] == "user"), "")
        return "messages:" + first_user
    return "prompt:" + row["prompt"]


def to_messages(row: dict[str, Any]) -> list[dict[str, str]]:
    """A row as chat messages (prompt/response rows become system?/user/assistant)."""
    if "messages" in row:
        return list(row["messages"])
    messages = [{"role": "system", "content": row["system"]}] if row.get("system") else []
    return messages + [{"role": "user", "content": row["prompt"]},
                       {"role": "assistant", "content": row["response"]}]


# --------------------------------------------------------------------------- tokenization


def tokenize_instructions(rows: Iterable[dict[str, Any]], tokenizer: Any, *, max_length: int,
                          drop_unsupervised: bool = True) -> list[dict[str, list[int]]]:
    """Render each row with the chat template and label only the assistant tokens.

    ``labels[i] == input_ids[i]`` on assistant content and its closing eos, ``-100`` elsewhere
    (the model shifts labels itself). Sequences longer than ``max_length`` are cut from the right;
    a row left with no labelled token is dropped with a warning (``drop_unsupervised``).

    Args:
        rows: rows from :func:`load_instructions`.
        tokenizer: a fast tokenizer with a chat template (one trained by llmstack, or any template
            that marks assistant turns with ``{% generation %}``).
        max_length: longest sequence kept.
        drop_unsupervised: drop rows whose labels are all -100 after truncation.

    Returns:
        ``[{"input_ids": [...], "labels": [...]}, ...]`` in row order.

    Example:
        >>> ex = tokenize_instructions([{"prompt": "Hi", "response": "Hello"}], tok, max_length=64)  # doctest: +SKIP
    """
    from llmstack.data.tokenizer import CHAT_TEMPLATE

    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise DataError(f"max_length must be an integer >= 2, got {max_length!r}")
    conversations = [to_messages(row) for row in rows]
    if not conversations:
        raise DataError("tokenize_instructions: no rows given")
    template = getattr(tokenizer, "chat_template", None)
    if template == CHAT_TEMPLATE:
        examples = _tokenize_native(conversations, tokenizer)
    elif isinstance(template, str) and "{% generation %}" in template.replace("{%- generation", "{% generation"):
        examples = _tokenize_generic(conversations, tokenizer)
    else:
        raise DataError("the tokenizer's chat template does not mark assistant turns ({% generation %}); "
                        "use a tokenizer trained by llmstack (train_tokenizer) or one whose template does")
    out: list[dict[str, list[int]]] = []
    dropped = 0
    for input_ids, labels in examples:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
        if drop_unsupervised and all(label == IGNORE_INDEX for label in labels):
            dropped += 1
            continue
        out.append({"input_ids": input_ids, "labels": labels})
    if dropped:
        warnings.warn(f"{dropped} of {len(examples)} instruction rows have no response token within "
                      f"max_length={max_length} and were dropped", stacklevel=2)
    if not out:
        raise DataError(f"no instruction row keeps a response token within max_length={max_length}; "
                        "raise max_length")
    return out


def _tokenize_native(conversations: list[list[dict[str, str]]], tokenizer: Any) -> list[tuple[list[int], list[int]]]:
    """Segment-wise encoding for llmstack's own template (batched; identical to apply_chat_template)."""
    from llmstack.data.tokenizer import ASSISTANT, END, SYSTEM, USER

    ids = dict(zip(("system", "user", "assistant", "end"),
                   tokenizer.convert_tokens_to_ids([SYSTEM, USER, ASSISTANT, END]), strict=True))
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    contents = [m["content"] for conv in conversations for m in conv]
    # message text is data: a literal "<|assistant|>" inside it must not become a role marker
    encoded = tokenizer(contents, add_special_tokens=False, split_special_tokens=True)["input_ids"] if contents else []
    pieces = iter(encoded)
    examples: list[tuple[list[int], list[int]]] = []
    for conv in conversations:
        input_ids, labels = [bos], [IGNORE_INDEX]
        for message in conv:
            content = next(pieces)
            if message["role"] == "assistant":
                input_ids += [ids["assistant"], *content, eos]
                labels += [IGNORE_INDEX, *content, eos]
            else:
                segment = [ids[message["role"]], *content, ids["end"]]
                input_ids += segment
                labels += [IGNORE_INDEX] * len(segment)
        examples.append((input_ids, labels))
    return examples


def _tokenize_generic(conversations: list[list[dict[str, str]]], tokenizer: Any) -> list[tuple[list[int], list[int]]]:
    examples: list[tuple[list[int], list[int]]] = []
    for conv in conversations:
        encoded = tokenizer.apply_chat_template(conv, tokenize=True, return_dict=True,
                                                return_assistant_tokens_mask=True)
        input_ids = list(encoded["input_ids"])
        mask = list(encoded["assistant_masks"])
        examples.append((input_ids, [t if m else IGNORE_INDEX for t, m in zip(input_ids, mask, strict=True)]))
    return examples


def collate_instructions(examples: Sequence[dict[str, list[int]]], *, pad_id: int,
                         max_length: int | None = None) -> dict[str, Any]:
    """Right-pad examples into a batch: ``input_ids``, ``labels`` (-100 on padding), ``attention_mask``."""
    import torch

    if not examples:
        raise DataError("collate_instructions: empty batch")
    width = max(len(e["input_ids"]) for e in examples)
    if max_length is not None:
        width = min(width, max_length)
    batch = {"input_ids": torch.full((len(examples), width), pad_id, dtype=torch.long),
             "labels": torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long),
             "attention_mask": torch.zeros((len(examples), width), dtype=torch.long)}
    for row, example in enumerate(examples):
        n = min(len(example["input_ids"]), width)
        batch["input_ids"][row, :n] = torch.tensor(example["input_ids"][:n])
        batch["labels"][row, :n] = torch.tensor(example["labels"][:n])
        batch["attention_mask"][row, :n] = 1
    return batch


def pack_instructions(examples: Sequence[dict[str, list[int]]], *, max_length: int, pad_id: int) -> dict[str, Any]:
    """Greedily concatenate examples (in order) into rows of ``max_length`` tokens.

    An example never straddles two rows; a row is closed when the next example does not fit, and
    padded (labels -100, attention_mask 0). Examples in one row attend to each other, the usual
    trade-off of packing; each still starts with ``<|bos|>``.

    Returns:
        ``{"input_ids", "labels", "attention_mask"}`` tensors ``[n_rows, max_length]``.
    """
    import torch

    rows: list[dict[str, list[int]]] = []
    current: dict[str, list[int]] = {"input_ids": [], "labels": []}
    for example in examples:
        ids, labels = example["input_ids"][:max_length], example["labels"][:max_length]
        if current["input_ids"] and len(current["input_ids"]) + len(ids) > max_length:
            rows.append(current)
            current = {"input_ids": [], "labels": []}
        current["input_ids"] += ids
        current["labels"] += labels
    if current["input_ids"]:
        rows.append(current)
    if not rows:
        raise DataError("pack_instructions: no examples")
    batch = collate_instructions(rows, pad_id=pad_id, max_length=max_length)
    if batch["input_ids"].shape[1] < max_length:  # always return full-width rows
        pad = max_length - batch["input_ids"].shape[1]
        batch["input_ids"] = torch.nn.functional.pad(batch["input_ids"], (0, pad), value=pad_id)
        batch["labels"] = torch.nn.functional.pad(batch["labels"], (0, pad), value=IGNORE_INDEX)
        batch["attention_mask"] = torch.nn.functional.pad(batch["attention_mask"], (0, pad), value=0)
    return batch


def instruction_fingerprint(rows: Iterable[dict[str, Any]]) -> str:
    """sha256 over the rows (canonical JSON), for lineage of fine-tuning data."""
    digest = hashlib.sha256(b"llmstack-instructions-v1\n")
    for row in rows:
        digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode() + b"\n")
    return digest.hexdigest()
