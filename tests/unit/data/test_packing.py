"""Packing: shapes, EOS joins, deterministic split without overlap, fingerprint coverage."""

from __future__ import annotations

import pytest
import torch

from llmstack.data import Corpus, pack_corpus, train_tokenizer
from llmstack.errors import DataError


@pytest.fixture(scope="module")
def packed(small_corpus, tokenizer):
    return pack_corpus(small_corpus, tokenizer, block_size=64, eval_fraction=0.1, seed=0)


def test_shapes_and_contents(packed, small_corpus, tokenizer) -> None:
    n_blocks = packed.num_tokens // 64
    assert packed.train.dtype == torch.long and packed.train.shape[1] == packed.eval.shape[1] == 64
    assert packed.train.shape[0] + packed.eval.shape[0] == n_blocks
    assert packed.eval.shape[0] == round(n_blocks * 0.1)
    expected: list[int] = []
    for doc in small_corpus.documents:
        expected += tokenizer(doc)["input_ids"] + [tokenizer.eos_token_id]
    assert packed.num_tokens == len(expected)
    # every block is a contiguous slice of the EOS-joined stream
    stream = torch.tensor(expected[: n_blocks * 64]).view(n_blocks, 64)
    all_blocks = torch.cat([packed.train, packed.eval])
    assert sorted(map(tuple, all_blocks.tolist())) == sorted(map(tuple, stream.tolist()))
    assert (all_blocks == tokenizer.eos_token_id).sum() >= len(small_corpus.documents) - 1


def test_split_is_deterministic_and_disjoint(packed, small_corpus, tokenizer) -> None:
    again = pack_corpus(small_corpus, tokenizer, block_size=64, eval_fraction=0.1, seed=0)
    assert torch.equal(again.train, packed.train) and torch.equal(again.eval, packed.eval)
    assert again.fingerprint == packed.fingerprint
    # no block position is in both splits (blocks are disjoint slices; compare by stream position)
    n_blocks = packed.num_tokens // 64
    from llmstack.data.packing import split_indices

    train_idx, eval_idx = split_indices(n_blocks, eval_fraction=0.1, seed=0)
    assert not set(train_idx.tolist()) & set(eval_idx.tolist())
    assert len(train_idx) + len(eval_idx) == n_blocks
    other = pack_corpus(small_corpus, tokenizer, block_size=64, eval_fraction=0.1, seed=1)
    assert not torch.equal(other.eval, packed.eval)
    assert other.fingerprint != packed.fingerprint


def test_fingerprint_covers_inputs(packed, small_corpus, tokenizer) -> None:
    assert pack_corpus(small_corpus, tokenizer, block_size=32, eval_fraction=0.1).fingerprint != packed.fingerprint
    fewer = Corpus.from_documents("x", small_corpus.documents[:-1])
    assert pack_corpus(fewer, tokenizer, block_size=64, eval_fraction=0.1).fingerprint != packed.fingerprint
    other_tok = train_tokenizer(small_corpus.documents, vocab_size=600)
    assert pack_corpus(small_corpus, other_tok, block_size=64, eval_fraction=0.1).fingerprint != packed.fingerprint


def test_too_little_data_and_bad_arguments(tokenizer) -> None:
    tiny = Corpus.from_documents("tiny.txt", ["just a few words"])
    with pytest.raises(DataError, match=r"tiny.txt: \d+ tokens make 0 block\(s\) of 64; need at least 2"):
        pack_corpus(tiny, tokenizer, block_size=64)
    with pytest.raises(DataError, match="block_size must be an integer >= 2"):
        pack_corpus(tiny, tokenizer, block_size=1)
    with pytest.raises(DataError, match=r"eval_fraction must be in \(0, 0.5\)"):
        pack_corpus(tiny, tokenizer, block_size=4, eval_fraction=0.0)


def test_special_token_strings_in_documents_stay_text(tokenizer) -> None:
    corpus = Corpus.from_documents("x", ["an <|eos|> inside", "and <|bos|><|pad|> too"] * 40)
    packed = pack_corpus(corpus, tokenizer, block_size=16, eval_fraction=0.1)
    blocks = torch.cat([packed.train, packed.eval])
    assert not (blocks == tokenizer.bos_token_id).any() and not (blocks == tokenizer.pad_token_id).any()
    assert (blocks == tokenizer.eos_token_id).sum() <= len(corpus.documents)  # only the joins
    assert "an <|eos|> inside" in tokenizer.decode(blocks.flatten().tolist())


def test_documents_get_the_tokenizers_bos_where_it_adds_one(small_corpus, tokenizer, packed) -> None:
    """A tokenizer that adds BOS (Gemma, Llama) starts every packed document with it; the fingerprint tells the two
    apart. llmstack's own tokenizer adds nothing, so its stream stays the bare text's ids (test_shapes_and_contents)."""
    from llmstack.data.packing import encode_documents
    from llmstack.serve._testing import bos_tokenizer

    adding = bos_tokenizer(tokenizer)
    documents = small_corpus.documents
    encoded = encode_documents(documents, adding)
    assert encoded == [[adding.bos_token_id, *tokenizer(d)["input_ids"], adding.eos_token_id] for d in documents]
    with_bos = pack_corpus(small_corpus, adding, block_size=64, eval_fraction=0.1, seed=0)
    assert with_bos.num_tokens == packed.num_tokens + len(documents)
    stream = torch.cat([with_bos.train, with_bos.eval]).flatten().tolist()
    after_eos = [stream[i + 1] for i in range(len(stream) - 1) if stream[i] == adding.eos_token_id]
    assert after_eos and set(after_eos) == {adding.bos_token_id}  # every document opens with BOS
    assert with_bos.fingerprint != packed.fingerprint
    # A tokenizer that closes documents with EOS itself gets no second one.
    from tokenizers import processors

    closing = bos_tokenizer(tokenizer)
    closing.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {closing.eos_token}", special_tokens=[(closing.eos_token, closing.eos_token_id)])
    assert encode_documents(["line 1"], closing) == [[*tokenizer("line 1")["input_ids"], closing.eos_token_id]]
