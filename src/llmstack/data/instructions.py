"""Instruction data: load rows in the formats users bring, apply the chat template, mask the prompt.

Sources: ``builtin:stdlib-qa`` (the built-in question/answer pairs); ``.jsonl`` / ``.json`` (JSON
lines, or one JSON array as Alpaca ships) / ``.parquet`` files, globs and fsspec URLs; a
``datasets.save_to_disk`` directory; and ``hf:<path>[?name=..&split=..&data_files=..]`` through
``datasets.load_dataset`` (a hub id when online, a local dataset folder, or a builder name with local
files: ``hf:csv?data_files=rows.csv``). Row formats (messages, ShareGPT, Alpaca, TRL
prompt/completion, prompt/response, plain text) and the ``data.columns`` renaming are described in
:mod:`llmstack.data.formats`.

Labels are ``-100`` everywhere except on what the model should learn to write: each assistant
turn's content and the token that closes it (``<|eos|>``, ``<|im_end|>``, ``<|eot_id|>``, ...),
a TRL completion plus eos, every token of a text row; or every token with ``train_on_inputs``.
Templates with ``{% generation %}`` markers are masked by transformers; others turn by turn
(:mod:`llmstack.data.chat_templates`).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from llmstack.errors import DataError

IGNORE_INDEX = -100
SPLITS = ("train", "eval", "all")


def load_instructions(source: str, *, split: str | None = None, max_rows: int | None = None,
                      storage_options: dict[str, Any] | None = None,
                      columns: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """Load and validate instruction rows.

    Args:
        source: ``builtin:stdlib-qa``; a path/URL/glob of ``.jsonl``, ``.json`` (lines or one array) or
            ``.parquet`` files, or a ``datasets.save_to_disk`` directory; or ``hf:<path>`` with optional
            ``?name=..&split=..&data_files=..`` for ``datasets.load_dataset`` (split defaults to train).
        split: ``"train"``, ``"eval"`` or ``"all"``. None means ``"train"`` for the builtin and
            ``"all"`` for files. For files, train/eval is a deterministic ~5% hold-out keyed on the
            row's prompt text, so the same row always lands in the same split.
        max_rows: keep only the first N rows of the split.
        storage_options: fsspec options for remote URLs.
        columns: ``{canonical field: column}`` renames applied before the format is recognized
            (``{"prompt": "question", "response": "answer"}``).

    Returns:
        Rows ``{"prompt", "response"[, "system"]}``, ``{"messages": [...]}``, ``{"prompt", "completion"}``
        or ``{"text"}`` (see :mod:`llmstack.data.formats`).

    Raises:
        DataError: missing/empty file, invalid JSON, a row no format matches (its fields and the
            ``data.columns`` mapping to give), a row without a response or with an unknown role;
            the message names the file and line.

    Example:
        >>> rows = load_instructions("builtin:stdlib-qa", split="eval")
        >>> sorted(rows[0])
        ['prompt', 'response']
    """
    from llmstack.data.formats import check_columns, normalize_row

    if split is not None and split not in SPLITS:
        raise DataError(f"split must be one of {', '.join(SPLITS)} or None, got {split!r}")
    problems = check_columns(columns or {})
    if problems:
        raise DataError("data.columns: " + "; ".join(problems))
    if source.startswith("builtin:"):
        if source != "builtin:stdlib-qa":
            raise DataError(f"unknown builtin instruction dataset {source!r}; known: builtin:stdlib-qa")
        from llmstack.data.builtin import stdlib_qa_rows

        split = split or "train"
        rows: list[dict[str, Any]] = stdlib_qa_rows(None if split == "all" else split)
    else:
        raw_rows = _iter_hf_rows(source) if source.startswith("hf:") else _iter_rows(source, storage_options or {})
        rows = [normalize_row(raw, where, columns) for where, raw in raw_rows]
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
    """``(location, raw row)`` pairs; location is ``file:line`` (jsonl), ``file: item i`` or ``file: row i``."""
    from llmstack.data.corpus import (COMPRESSION_SUFFIXES, _display, _kind, _read_bytes, decode_utf8, iter_jsonl,
                                      load_saved_dataset, resolve_files)

    fs, paths, is_dataset = resolve_files(source, storage_options)
    if is_dataset:
        loaded = load_saved_dataset(source, storage_options=storage_options)
        for index, row in enumerate(loaded):
            yield f"{source}: row {index}", row
        return
    for path in paths:
        name = source if paths == [fs._strip_protocol(source)] else _display(fs, path)
        fmt, compression = _kind(path)
        bare = path.lower()
        for suffix in COMPRESSION_SUFFIXES:
            bare = bare.removesuffix(suffix)
        if fmt is None and bare.endswith(".json"):
            fmt = "json"
        if fmt in ("jsonl", "json"):
            text = decode_utf8(_read_bytes(fs, path, name, compression), name)
            if not text.strip():
                raise DataError(f"{name}: the file is empty")
            if fmt == "json" and text.lstrip().startswith("["):
                yield from _json_array(text, name)
                continue
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
            raise DataError(f"{name}: instruction data must be .jsonl, .json or .parquet (or a datasets directory, "
                            "or hf:<builder>?data_files=... for other files)")


def _json_array(text: str, name: str) -> Iterator[tuple[str, Any]]:
    """Items of a file holding one JSON array (Alpaca's ``alpaca_data.json`` layout)."""
    try:
        items = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{name}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    for index, item in enumerate(items):
        yield f"{name}: item {index}", item


def _parse_hf_source(source: str) -> tuple[str, dict[str, str]]:
    """``hf:path?key=value&...`` as ``(path, {name, split, data_files, revision})``."""
    from urllib.parse import parse_qsl

    path, _, query = source.removeprefix("hf:").partition("?")
    options = dict(parse_qsl(query, keep_blank_values=True))
    unknown = sorted(set(options) - {"name", "split", "data_files", "revision"})
    if not path or unknown:
        raise DataError(f"{source}: expected hf:<hub id, dataset folder or builder>[?name=..&split=..&data_files=.."
                        f"&revision=..]" + (f"; unknown option {', '.join(unknown)}" if unknown else ""))
    return path, options


def _iter_hf_rows(source: str) -> Iterator[tuple[str, Any]]:
    """Rows of ``datasets.load_dataset`` (one split, ``train`` unless ``?split=`` says otherwise)."""
    import datasets

    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

    from llmstack.data.builtin import cache_root

    path, options = _parse_hf_source(source)
    split = options.pop("split", None) or "train"
    # local files (through a builder, or a dataset folder) are cached with llmstack's data; hub datasets in HF's
    local = path in _PACKAGED_DATASETS_MODULES or Path(path).expanduser().exists()
    cache = str(cache_root() / "datasets") if local else None
    try:
        loaded = datasets.load_dataset(path, split=split, cache_dir=cache, **options)
    except Exception as exc:  # FileNotFoundError, DatasetNotFoundError, ConnectionError (offline), ValueError
        reason = (str(exc).strip().splitlines() or [""])[0]
        call = ", ".join([repr(path), f"split={split!r}", *(f"{k}={v!r}" for k, v in options.items())])
        raise DataError(f"{source}: datasets.load_dataset({call}) failed ({type(exc).__name__}: {reason}); "
                        "a hub id needs the network (or the datasets cache); local files need a builder "
                        "name: hf:json?data_files=rows.jsonl") from None
    for index, row in enumerate(loaded):
        yield f"{source}: row {index}", row


def _row_key(row: dict[str, Any]) -> str:
    if "messages" in row:
        first_user = next((m["content"] for m in row["messages"] if m["role"] == "user"), "")
        return "messages:" + first_user
    if "text" in row:
        return "text:" + row["text"]
    return "prompt:" + row["prompt"]


def to_messages(row: dict[str, Any]) -> list[dict[str, str]]:
    """A chat row as messages (prompt/response rows become system?/user/assistant).

    Raises:
        DataError: for plain rows (``text``, TRL ``prompt``/``completion`` strings), which are not chats.
    """
    if "messages" in row:
        return list(row["messages"])
    if "response" not in row:
        raise DataError(f"a {'text' if 'text' in row else 'prompt/completion'} row is plain text, not a chat "
                        "conversation")
    messages = [{"role": "system", "content": row["system"]}] if row.get("system") else []
    return messages + [{"role": "user", "content": row["prompt"]},
                       {"role": "assistant", "content": row["response"]}]


def is_chat_row(row: dict[str, Any]) -> bool:
    """Whether a normalized row is rendered with the chat template (else it is plain text)."""
    return "messages" in row or "response" in row


# --------------------------------------------------------------------------- tokenization


def tokenize_instructions(rows: Iterable[dict[str, Any]], tokenizer: Any, *, max_length: int,
                          drop_unsupervised: bool = True, train_on_inputs: bool = False,
                          chat_template: str | None = None) -> list[dict[str, list[int]]]:
    """Tokenize rows and label what the model should learn to write.

    Chat rows are rendered with the chat template; ``labels[i] == input_ids[i]`` on each assistant
    turn's content and the token that closes it, ``-100`` elsewhere (the model shifts labels itself).
    ``input_ids`` are what ``tokenizer.apply_chat_template(messages)`` gives. Plain rows need no
    template: a TRL ``prompt``/``completion`` row is the prompt's tokens (as the tokenizer encodes
    text, BOS included when it adds one) then the completion's and eos, labelled on the completion
    and eos; a ``text`` row is labelled on every token. Sequences longer than ``max_length`` are cut
    from the right; a row left with no labelled token is dropped with a warning (``drop_unsupervised``).

    Args:
        rows: rows from :func:`load_instructions`.
        tokenizer: a fast tokenizer; chat rows need a chat template (its own or ``chat_template``).
        max_length: longest sequence kept.
        drop_unsupervised: drop rows whose labels are all -100 after truncation.
        train_on_inputs: label every token (system, user and template tokens too), not only the answers.
        chat_template: Jinja text rendering the chats instead of the tokenizer's own template
            (see :func:`llmstack.data.chat_templates.resolve_chat_template` for names and files).

    Returns:
        ``[{"input_ids": [...], "labels": [...]}, ...]`` in row order.

    Raises:
        DataError: no template for chat rows (says to set data.chat_template), or a conversation the
            template refuses or rewrites (names the row index and the reason).

    Example:
        >>> ex = tokenize_instructions([{"prompt": "Hi", "response": "Hello"}], tok, max_length=64)  # doctest: +SKIP
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise DataError(f"max_length must be an integer >= 2, got {max_length!r}")
    rows = list(rows)
    if not rows:
        raise DataError("tokenize_instructions: no rows given")
    chat_at = [i for i, row in enumerate(rows) if is_chat_row(row)]
    examples: list[tuple[list[int], list[int]] | None] = [None] * len(rows)
    if chat_at:
        chats = _tokenize_chats([to_messages(rows[i]) for i in chat_at], tokenizer, chat_template=chat_template,
                                train_on_inputs=train_on_inputs, row_numbers=chat_at)
        for i, example in zip(chat_at, chats, strict=True):
            examples[i] = example
    plain_at = [i for i, row in enumerate(rows) if not is_chat_row(row)]
    if plain_at:
        plain = _tokenize_plain([rows[i] for i in plain_at], tokenizer, train_on_inputs=train_on_inputs)
        for i, example in zip(plain_at, plain, strict=True):
            examples[i] = example
    out: list[dict[str, list[int]]] = []
    dropped = 0
    for example in examples:
        assert example is not None
        input_ids, labels = example[0][:max_length], example[1][:max_length]
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


def _tokenize_chats(conversations: list[list[dict[str, str]]], tokenizer: Any, *, chat_template: str | None,
                    train_on_inputs: bool, row_numbers: list[int]) -> list[tuple[list[int], list[int]]]:
    """Pick the masking path for the template: llmstack's own, ``{% generation %}``, or turn by turn."""
    from llmstack.data.chat_templates import has_generation_markers, mask_by_prefix, no_template_error
    from llmstack.data.tokenizer import CHAT_TEMPLATE

    template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one renders chats
        template = template.get("default")
    if not isinstance(template, str) or not template.strip():
        raise no_template_error()
    # errors name a conversation by its index among all the rows given (row_numbers), not among the chats
    if template == CHAT_TEMPLATE and _has_native_tokens(tokenizer):
        examples = _tokenize_native(conversations, tokenizer)
    elif train_on_inputs:
        examples = _tokenize_whole(conversations, tokenizer, template, row_numbers)
    elif has_generation_markers(template):
        examples = _tokenize_generic(conversations, tokenizer, template, row_numbers)
    else:
        examples = mask_by_prefix(conversations, tokenizer, template, row_numbers=row_numbers)
    if train_on_inputs:
        return [(ids, list(ids)) for ids, _ in examples]
    return examples


def _has_native_tokens(tokenizer: Any) -> bool:
    from llmstack.data.tokenizer import SPECIAL_TOKENS

    vocab = tokenizer.get_vocab()
    return all(token in vocab for token in SPECIAL_TOKENS)


def _tokenize_whole(conversations: list[list[dict[str, str]]], tokenizer: Any, template: str,
                    row_numbers: list[int]) -> list[tuple[list[int], list[int]]]:
    """Each conversation as ``apply_chat_template`` tokenizes it (labels filled in by the caller)."""
    from llmstack.data.chat_templates import render_chat

    texts = [render_chat(tokenizer, template, conv, generation_prompt=False, index=index, conv=conv)
             for index, conv in zip(row_numbers, conversations, strict=True)]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [(list(ids), list(ids)) for ids in encoded]


def _tokenize_plain(rows: list[dict[str, Any]], tokenizer: Any, *, train_on_inputs: bool
                    ) -> list[tuple[list[int], list[int]]]:
    """Text rows (every token) and TRL prompt/completion rows (completion + eos), no chat template."""
    eos = tokenizer.eos_token_id
    firsts = [row["prompt"] if "prompt" in row else row["text"] for row in rows]
    seconds = [row.get("completion", "") for row in rows]
    # the first part as the tokenizer encodes a text (BOS when it adds one); the completion continues it,
    # as at inference where the prompt is encoded alone and the model writes the rest
    first_ids = tokenizer(firsts, add_special_tokens=True)["input_ids"]
    second_ids = tokenizer(seconds, add_special_tokens=False)["input_ids"]
    examples: list[tuple[list[int], list[int]]] = []
    for row, first, second in zip(rows, first_ids, second_ids, strict=True):
        first, second = list(first), list(second)
        if eos is not None and (first + second)[-1:] != [eos]:
            second.append(eos)  # the model learns to stop
        input_ids = first + second
        if "text" in row or train_on_inputs:
            labels = list(input_ids)
        else:
            labels = [IGNORE_INDEX] * len(first) + second
        examples.append((input_ids, labels))
    return examples


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


def _tokenize_generic(conversations: list[list[dict[str, str]]], tokenizer: Any, template: str,
                      row_numbers: list[int]) -> list[tuple[list[int], list[int]]]:
    """Templates with ``{% generation %}`` markers: transformers returns the assistant mask."""
    from llmstack.data.chat_templates import refused

    examples: list[tuple[list[int], list[int]]] = []
    for index, conv in zip(row_numbers, conversations, strict=True):
        try:
            encoded = tokenizer.apply_chat_template(conv, chat_template=template, tokenize=True, return_dict=True,
                                                    return_assistant_tokens_mask=True)
        except Exception as exc:
            raise refused(index, conv, exc) from None
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
