"""One call from a :class:`~llmstack.config.DataConfig` to a tokenizer and packed blocks."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from llmstack.data.corpus import Corpus, load_corpus
from llmstack.data.packing import PackedData, pack_corpus

TOKENIZER_CACHE_VERSION = 1


def _tokenizer_cache_dir(corpus: Corpus, vocab_size: int) -> Path:
    from llmstack.data.builtin import cache_root

    key = hashlib.sha256(f"v{TOKENIZER_CACHE_VERSION}|{corpus.fingerprint}|{vocab_size}".encode()).hexdigest()[:24]
    return cache_root() / "tokenizers" / key


def trained_tokenizer(corpus: Corpus, *, vocab_size: int, cache: bool = True) -> Any:
    """:func:`train_tokenizer` on ``corpus``, reusing an on-disk copy trained on the same corpus.

    Training is deterministic, so a cached tokenizer keyed on (corpus fingerprint, vocab size) is
    the tokenizer a fresh run would train.
    """
    from llmstack.data.tokenizer import train_tokenizer

    directory = _tokenizer_cache_dir(corpus, vocab_size)
    if cache and (directory / "tokenizer.json").is_file():
        try:
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(str(directory))
        except Exception:
            pass  # damaged cache entry: retrain below
    tokenizer = train_tokenizer(corpus.documents, vocab_size=vocab_size)
    if cache:
        try:
            directory.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".tok-", dir=str(directory.parent)))
            tokenizer.save_pretrained(str(tmp))
            try:
                os.rename(tmp, directory)  # atomic publish; loses harmlessly to a concurrent writer
            except OSError:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass
    return tokenizer


def prepare_training_data(config: Any, *, tokenizer: Any = None, progress: bool | None = None
                          ) -> tuple[Any, PackedData, Corpus]:
    """Load the corpus described by ``config``, get a tokenizer, and pack train/eval blocks.

    The tokenizer is, in order: the ``tokenizer`` argument; ``config.tokenizer`` (a registry ref
    or a directory, loaded with :func:`llmstack.models.load_tokenizer`); or a byte-level BPE
    trained on the corpus with ``config.vocab_size`` (cached on disk, deterministic).

    Args:
        config: a :class:`~llmstack.config.DataConfig` (or a dict of its fields).
        tokenizer: a ready tokenizer to use instead.
        progress: show tokenization progress (None: only for large corpora).

    Returns:
        ``(tokenizer, packed, corpus)``.

    Example:
        >>> from llmstack.config import DataConfig
        >>> tok, packed, corpus = prepare_training_data(DataConfig(max_documents=20, vocab_size=512))
        >>> packed.train.shape[1]
        128
    """
    from llmstack.config import DataConfig, load_config

    if isinstance(config, dict):
        config = load_config(DataConfig, config)
    corpus = load_corpus(config.source, text_field=config.text_field, max_documents=config.max_documents,
                         storage_options=config.storage_options or None)
    if tokenizer is None:
        if config.tokenizer:
            from llmstack.models import load_tokenizer

            tokenizer = load_tokenizer(config.tokenizer)
        else:
            tokenizer = trained_tokenizer(corpus, vocab_size=config.vocab_size)
    packed = pack_corpus(corpus, tokenizer, block_size=config.block_size, eval_fraction=config.eval_fraction,
                         seed=config.seed, progress=progress)
    return tokenizer, packed, corpus


def prepare_instruction_data(source: str, tokenizer: Any, *, max_length: int,
                             storage_options: dict[str, Any] | None = None, max_rows: int | None = None,
                             columns: dict[str, str] | None = None, chat_template: str | None = None,
                             train_on_inputs: bool = False
                             ) -> tuple[list[dict[str, list[int]]], list[dict[str, list[int]]]]:
    """``(train_examples, eval_examples)`` tokenized with prompt masking, from the same source.

    The eval examples are the deterministic held-out split of :func:`load_instructions`;
    ``columns``, ``chat_template`` (Jinja text) and ``train_on_inputs`` are as in
    :func:`~llmstack.data.tokenize_instructions` and :func:`load_instructions`.
    """
    from llmstack.data.instructions import load_instructions, tokenize_instructions

    def examples(split: str) -> list[dict[str, list[int]]]:
        rows = load_instructions(source, split=split, storage_options=storage_options, max_rows=max_rows,
                                 columns=columns)
        return tokenize_instructions(rows, tokenizer, max_length=max_length, chat_template=chat_template,
                                     train_on_inputs=train_on_inputs)

    return examples("train"), examples("eval")
