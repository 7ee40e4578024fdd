"""prepare_training_data: DataConfig in, (tokenizer, packed blocks, corpus) out."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmstack.config import DataConfig
from llmstack.data import prepare_instruction_data, prepare_training_data, tokenizer_fingerprint
from llmstack.data.prepare import _tokenizer_cache_dir
from llmstack.errors import DataError


def test_builtin_end_to_end_and_tokenizer_cache() -> None:
    config = DataConfig(source="builtin:stdlib", max_documents=40, vocab_size=512, block_size=64)
    tokenizer, packed, corpus = prepare_training_data(config)
    assert len(corpus.documents) == 40 and len(tokenizer) == 512
    assert packed.train.shape[1] == 64 and packed.eval.shape[0] >= 1
    assert packed.info["corpus_fingerprint"] == corpus.fingerprint
    assert (_tokenizer_cache_dir(corpus, 512) / "tokenizer.json").is_file()
    again_tok, again, _ = prepare_training_data(config)  # served from the tokenizer cache
    assert tokenizer_fingerprint(again_tok) == tokenizer_fingerprint(tokenizer)
    assert again.fingerprint == packed.fingerprint


def test_given_tokenizer_and_tokenizer_directory(tmp_path: Path, tokenizer) -> None:
    data = tmp_path / "corpus.txt"
    data.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog." for i in range(200)))
    config = DataConfig(source=str(data), block_size=32)
    tok, packed, corpus = prepare_training_data(config, tokenizer=tokenizer)
    assert tok is tokenizer and len(corpus.documents) == 200
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    loaded, packed_from_dir, _ = prepare_training_data(DataConfig(source=str(data), block_size=32,
                                                                  tokenizer=str(tmp_path / "tok")))
    assert tokenizer_fingerprint(loaded) == tokenizer_fingerprint(tokenizer)
    assert packed_from_dir.fingerprint == packed.fingerprint


def test_dict_config_and_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file or directory"):
        prepare_training_data({"source": str(tmp_path / "missing.txt")})


def test_prepare_instruction_data(tokenizer) -> None:
    train, held_out = prepare_instruction_data("builtin:stdlib-qa", tokenizer, max_length=96, max_rows=50)
    assert len(train) == 50 and len(held_out) == 50
    assert {tuple(e["input_ids"]) for e in train}.isdisjoint({tuple(e["input_ids"]) for e in held_out})
