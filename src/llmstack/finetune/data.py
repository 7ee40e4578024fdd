"""Instruction rows -> the loop's tensor dicts (``input_ids``, ``labels``, ``attention_mask``).

Rows come from :func:`llmstack.data.load_instructions` in any format it recognizes (messages,
ShareGPT, Alpaca, TRL prompt/completion, plain text; ``data.columns`` renames columns first), and
name the file and line of a bad row. Prompts are labelled -100 so the loss covers the assistant's
tokens only (every token with ``data.train_on_inputs``); ``data.chat_template`` replaces the
tokenizer's template. The eval tensors are the source's deterministic held-out split, never
packed, so eval losses compare across runs with and without packing.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any

from llmstack.errors import DataError


@dataclass
class InstructionTensors:
    """Fixed-width training and held-out tensors plus what lineage needs."""

    train: dict[str, Any]  # {"input_ids","labels","attention_mask"}: LongTensor [N, T]
    eval: dict[str, Any] | None  # same layout, the held-out split (None when the source has none)
    fingerprint: str  # sha256 over the training rows
    num_train_rows: int
    num_eval_rows: int
    packed: bool

    @property
    def response_tokens(self) -> int:
        """Supervised (response) tokens in the training tensors."""
        return int((self.train["labels"][:, 1:] != -100).sum())


def _pad_id(tokenizer: Any) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    raise DataError("the tokenizer has neither a pad nor an eos token to pad batches with")


def _as_width(batch: dict[str, Any], width: int, pad_id: int) -> dict[str, Any]:
    """Right-pad a collated batch to exactly ``width`` columns."""
    import torch.nn.functional as F

    missing = width - batch["input_ids"].shape[1]
    if missing <= 0:
        return {k: v[:, :width].contiguous() for k, v in batch.items()}
    return {"input_ids": F.pad(batch["input_ids"], (0, missing), value=pad_id),
            "labels": F.pad(batch["labels"], (0, missing), value=-100),
            "attention_mask": F.pad(batch["attention_mask"], (0, missing), value=0)}


def _tokenize(rows: list[dict[str, Any]], tokenizer: Any, source: str, split: str, max_length: int,
              train_on_inputs: bool) -> list[dict[str, list[int]]]:
    from llmstack.data import tokenize_instructions

    try:
        return tokenize_instructions(rows, tokenizer, max_length=max_length, train_on_inputs=train_on_inputs)
    except DataError as exc:  # "row i" is an index within this split: say which
        raise DataError(f"{source} ({split} split): {exc}") from None


def instruction_tensors(source: str, tokenizer: Any, *, max_length: int, packing: bool = False,
                        max_rows: int | None = None, storage_options: dict[str, Any] | None = None,
                        columns: Mapping[str, str] | None = None, chat_template: str | None = None,
                        train_on_inputs: bool = False) -> InstructionTensors:
    """Load, template, mask and batch instruction data for fine-tuning.

    Args:
        source: ``builtin:stdlib-qa`` or a jsonl/parquet/datasets source of prompt/response or chat rows.
        tokenizer: the base model's tokenizer (its chat template renders the rows).
        max_length: tokens per row (longer conversations are cut from the right).
        packing: concatenate several examples per row (fewer pad tokens, faster epochs).
        max_rows: cap on rows read per split.
        storage_options: fsspec options for remote sources.
        columns: ``data.columns``, ``{canonical field: column}`` renames applied before the format is recognized.
        chat_template: ``data.chat_template``, a known name (``chatml``), a Jinja file or Jinja text. It is
            also set on ``tokenizer``, so a model saved with this tokenizer chats in the format it was tuned on.
        train_on_inputs: ``data.train_on_inputs``, label every token instead of the assistant's only.

    Raises:
        DataError: unreadable source, a row without a response (file and line named), a dataset
            whose columns match no format (lists them and the data.columns to give), a tokenizer
            without a chat template, a conversation the template refuses or rewrites (row named),
            no usable rows.
    """
    from llmstack.data import collate_instructions, instruction_fingerprint, load_instructions, pack_instructions
    from llmstack.data.chat_templates import resolve_chat_template

    if chat_template is not None:
        tokenizer.chat_template = resolve_chat_template(chat_template, tokenizer)
    train_rows = load_instructions(source, split="train", max_rows=max_rows, storage_options=storage_options,
                                   columns=columns)
    try:
        eval_rows = load_instructions(source, split="eval", max_rows=max_rows, storage_options=storage_options,
                                      columns=columns)
    except DataError as exc:  # a small file whose hold-out is empty: train on it all, no eval
        if "split is empty" not in str(exc):
            raise
        warnings.warn(f"{source}: no held-out rows, so no eval loss is reported", stacklevel=2)
        eval_rows = []
    pad_id = _pad_id(tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rows cut to nothing are dropped; counts are reported below
        train_examples = _tokenize(train_rows, tokenizer, source, "train", max_length, train_on_inputs)
        eval_examples = (_tokenize(eval_rows, tokenizer, source, "eval", max_length, train_on_inputs)
                         if eval_rows else [])
    if packing:
        train = pack_instructions(train_examples, max_length=max_length, pad_id=pad_id)
    else:
        train = _as_width(collate_instructions(train_examples, pad_id=pad_id, max_length=max_length),
                          max_length, pad_id)
    evaluation = None
    if eval_examples:
        evaluation = _as_width(collate_instructions(eval_examples, pad_id=pad_id, max_length=max_length),
                               max_length, pad_id)
    return InstructionTensors(train=train, eval=evaluation, fingerprint=instruction_fingerprint(train_rows),
                              num_train_rows=len(train_examples), num_eval_rows=len(eval_examples), packed=packing)
