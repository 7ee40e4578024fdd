"""Offline corpora, tokenizer training, dataset loading, packing and the chat/instruction format.

May import: ``config``, ``errors``, ``models`` (checked by tests/unit/test_import_graph.py).

Example:
    >>> from llmstack.data import load_corpus, train_tokenizer, pack_corpus
    >>> corpus = load_corpus("builtin:stdlib", max_documents=50)
    >>> tokenizer = train_tokenizer(corpus.documents, vocab_size=1024)
    >>> packed = pack_corpus(corpus, tokenizer, block_size=128)
"""

from llmstack.data.corpus import BUILTINS, Corpus, fingerprint_documents, load_corpus
from llmstack.data.instructions import (IGNORE_INDEX, collate_instructions, instruction_fingerprint,
                                        load_instructions, pack_instructions, to_messages, tokenize_instructions)
from llmstack.data.packing import PackedData, pack_corpus
from llmstack.data.prepare import prepare_instruction_data, prepare_training_data, trained_tokenizer
from llmstack.data.tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, tokenizer_fingerprint, train_tokenizer

__all__ = [
    "BUILTINS",
    "CHAT_TEMPLATE",
    "IGNORE_INDEX",
    "SPECIAL_TOKENS",
    "Corpus",
    "PackedData",
    "collate_instructions",
    "fingerprint_documents",
    "instruction_fingerprint",
    "load_corpus",
    "load_instructions",
    "pack_corpus",
    "pack_instructions",
    "prepare_instruction_data",
    "prepare_training_data",
    "to_messages",
    "tokenize_instructions",
    "tokenizer_fingerprint",
    "train_tokenizer",
    "trained_tokenizer",
]
