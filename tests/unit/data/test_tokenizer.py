"""Byte-level BPE tokenizer: round trips, specials, chat template, save/load, determinism."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmstack.data import CHAT_TEMPLATE, SPECIAL_TOKENS, tokenizer_fingerprint, train_tokenizer
from llmstack.errors import ConfigError, DataError

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is `json`?"},
            {"role": "assistant", "content": "A data format."}]


def test_specials_and_size(tokenizer) -> None:
    assert len(tokenizer) == 1024
    assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 1, 2)
    assert tokenizer("plain text")["input_ids"][0] != tokenizer.bos_token_id  # no specials added implicitly


@pytest.mark.parametrize("text", ["def f(x):\n    return x  # tabs\tand  spaces", "naïve café 😀 中文",
                                  "", " leading space", "line\r\nbreaks\n\n"])
def test_encode_decode_round_trip(tokenizer, text: str) -> None:
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert all(0 <= i < len(tokenizer) for i in ids)


def test_compresses_seen_text(tokenizer, small_corpus) -> None:
    text = small_corpus.documents[0]
    assert len(tokenizer(text)["input_ids"]) < 0.7 * len(text.encode())  # merges were learnt


def test_chat_template(tokenizer) -> None:
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False)
    assert text == "<|bos|><|system|>Be brief.<|end|><|user|>What is `json`?<|end|><|assistant|>A data format.<|eos|>"
    prompt = tokenizer.apply_chat_template(MESSAGES[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|end|><|assistant|>") and text.startswith(prompt)
    ids = tokenizer.apply_chat_template(MESSAGES, tokenize=True, return_dict=True)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    with pytest.raises(Exception, match="unknown chat role: tool"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_save_load_round_trip(tokenizer, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(str(tmp_path))
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert tokenizer_fingerprint(loaded) == tokenizer_fingerprint(tokenizer)
    assert loaded.chat_template == CHAT_TEMPLATE
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (0, 1, 2)
    sample = "Return the sum of a sequence of numbers."
    assert loaded(sample)["input_ids"] == tokenizer(sample)["input_ids"]
    assert loaded.apply_chat_template(MESSAGES, tokenize=False) == tokenizer.apply_chat_template(MESSAGES,
                                                                                                tokenize=False)


def test_training_is_deterministic(tokenizer, small_corpus) -> None:
    again = train_tokenizer(small_corpus.documents, vocab_size=1024)
    assert tokenizer_fingerprint(again) == tokenizer_fingerprint(tokenizer)
    other = train_tokenizer(small_corpus.documents[:30], vocab_size=1024)
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(tokenizer)


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError, match=r"vocab_size: must be an integer >= 263.*got 100"):
        train_tokenizer(["abc"], vocab_size=100)
    with pytest.raises(DataError, match="no non-blank documents"):
        train_tokenizer(["", "  "], vocab_size=512)
    with pytest.raises(DataError, match="single string"):
        train_tokenizer("abc", vocab_size=512)
