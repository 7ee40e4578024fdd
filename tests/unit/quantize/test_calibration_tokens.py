"""Calibration and perplexity texts are tokenized as the tokenizer defines (BOS per document where it adds one)."""

from __future__ import annotations

from llmstack.data import train_tokenizer
from llmstack.serve._testing import DOCS, bos_tokenizer

TEXTS = ["line 1: the value of x is 7.", "The quick brown fox jumps over the lazy dog.", "import os"] * 4


def test_calibration_texts_open_with_bos_only_where_the_tokenizer_adds_it() -> None:
    from llmstack.config import QuantizeConfig
    from llmstack.quantize._api import _DataPlan

    plain = train_tokenizer(DOCS, vocab_size=320)
    for tokenizer, opens_with_bos in ((plain, False), (bos_tokenizer(plain), True)):
        plan = _DataPlan(QuantizeConfig(seq_len=8), None, tokenizer, None)
        stream = plan._chunk(TEXTS).flatten().tolist()  # noqa: SLF001 - the tokenization under test
        expected = [t for text in TEXTS for t in tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]]
        assert stream == expected[:len(stream)] and len(stream) > len(expected) - 8
        assert (stream[0] == tokenizer.bos_token_id) == opens_with_bos
        assert (stream.count(tokenizer.bos_token_id) >= len(TEXTS) - 1) == opens_with_bos
