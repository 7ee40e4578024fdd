"""Fixtures for the data tests: an isolated corpus cache and one small trained tokenizer."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def data_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Point LLMSTACK_CACHE at a fresh directory so tests neither read nor pollute ~/.cache."""
    root = tmp_path_factory.mktemp("llmstack-cache")
    saved = os.environ.get("LLMSTACK_CACHE")
    os.environ["LLMSTACK_CACHE"] = str(root)
    yield root
    if saved is None:
        os.environ.pop("LLMSTACK_CACHE", None)
    else:
        os.environ["LLMSTACK_CACHE"] = saved


@pytest.fixture(scope="session")
def stdlib_corpus(data_cache: Path):
    from llmstack.data import load_corpus

    return load_corpus("builtin:stdlib")


@pytest.fixture(scope="session")
def small_corpus(stdlib_corpus):
    from llmstack.data import Corpus

    return Corpus.from_documents("builtin:stdlib[:60]", stdlib_corpus.documents[:60])


@pytest.fixture(scope="session")
def tokenizer(small_corpus):
    from llmstack.data import train_tokenizer

    return train_tokenizer(small_corpus.documents, vocab_size=1024)
