"""Tokenize a corpus and pack it into fixed-length blocks with a deterministic train/eval split."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from llmstack.errors import DataError

PROGRESS_MIN_DOCUMENTS = 2000  # show a progress bar from this many documents on
_BATCH = 256  # documents per tokenizer call


@dataclass
class PackedData:
    """Fixed-length token blocks ready for causal-LM training (labels = inputs; the model shifts).

    Attributes:
        train: ``LongTensor [n_train, block_size]``.
        eval: ``LongTensor [n_eval, block_size]``.
        fingerprint: sha256 over the corpus fingerprint, tokenizer fingerprint, block size,
            eval fraction and seed: equal fingerprints mean identical tensors.
        block_size: tokens per block.
        num_tokens: tokens in the EOS-joined stream before cutting (the tail that does not fill a
            block is dropped).
    """

    train: Any
    eval: Any
    fingerprint: str
    block_size: int = 0
    num_tokens: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        return (f"PackedData(train={tuple(self.train.shape)}, eval={tuple(self.eval.shape)}, "
                f"block_size={self.block_size}, fingerprint={self.fingerprint[:12]}…)")


def encode_documents(documents: list[str], tokenizer: Any, *, eos_id: int | None = None) -> list[list[int]]:
    """Each document's ids as ``tokenizer(document)`` gives them, then ``eos_id`` (the tokenizer's EOS by default).

    The tokenizer's own special tokens stay: one that adds BOS (Gemma, Llama) starts every document with it,
    as the model saw in pretraining; one that adds none (SmolLM2, llmstack's own) gives the bare text's ids.
    A tokenizer that already ends a document with EOS gets no second one. Special-token strings inside a
    document are plain text (a literal ``"<|eos|>"`` in the data is not a control token).
    """
    eos_id = tokenizer.eos_token_id if eos_id is None else eos_id
    if eos_id is None:
        raise DataError("the tokenizer has no eos token; documents are joined with it")
    encoded = tokenizer(list(documents), split_special_tokens=True)["input_ids"] if documents else []
    return [list(ids) if ids and ids[-1] == eos_id else [*ids, eos_id] for ids in encoded]


def tokenize_documents(documents: list[str], tokenizer: Any, *, eos_id: int | None = None,
                       progress: bool | None = None) -> Any:
    """One int64 numpy stream of :func:`encode_documents` (batched, with tqdm): every document with the
    tokenizer's special tokens (BOS where it adds one), each followed by ``eos_id``."""
    import numpy as np
    from tqdm.auto import tqdm

    eos_id = tokenizer.eos_token_id if eos_id is None else eos_id
    if eos_id is None:
        raise DataError("the tokenizer has no eos token; packing joins documents with it")
    show = len(documents) >= PROGRESS_MIN_DOCUMENTS if progress is None else progress
    pieces: list[Any] = []
    with tqdm(total=len(documents), desc="tokenizing", unit="doc", disable=not show) as bar:
        for start in range(0, len(documents), _BATCH):
            batch = documents[start:start + _BATCH]
            pieces += [np.asarray(ids, dtype=np.int64) for ids in encode_documents(batch, tokenizer, eos_id=eos_id)]
            bar.update(len(batch))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)


def split_indices(n_blocks: int, *, eval_fraction: float, seed: int) -> tuple[Any, Any]:
    """``(train_idx, eval_idx)``, each sorted, from a seeded permutation of ``range(n_blocks)``."""
    import numpy as np

    n_eval = max(1, int(round(n_blocks * eval_fraction)))
    if n_blocks - n_eval < 1:
        raise DataError(f"only {n_blocks} block(s): need at least one train and one eval block; "
                        "add data or lower data.block_size")
    permutation = np.random.default_rng(seed).permutation(n_blocks)
    return np.sort(permutation[n_eval:]), np.sort(permutation[:n_eval])


def pack_corpus(corpus: Any, tokenizer: Any, *, block_size: int, eval_fraction: float = 0.05,
                seed: int = 0, progress: bool | None = None) -> PackedData:
    """Tokenize ``corpus`` (BOS per document where the tokenizer adds one), join documents with EOS, cut into
    blocks and split train/eval.

    The split is a seeded permutation of whole blocks, so no block is in both splits and the same
    inputs always give the same tensors.

    Args:
        corpus: a :class:`~llmstack.data.Corpus`.
        tokenizer: a fast tokenizer with an eos token.
        block_size: tokens per block (>= 2).
        eval_fraction: share of blocks held out, in (0, 0.5); at least one block is held out.
        seed: seed of the split permutation.
        progress: show tqdm progress (None: only for large corpora).

    Returns:
        :class:`PackedData` with ``train`` ``[n_train, block_size]`` and ``eval`` ``[n_eval, block_size]``.

    Example:
        >>> from llmstack.data import load_corpus, train_tokenizer
        >>> corpus = load_corpus("builtin:stdlib", max_documents=20)
        >>> packed = pack_corpus(corpus, train_tokenizer(corpus, vocab_size=512), block_size=128)
        >>> packed.train.shape[1]
        128
    """
    import torch

    from llmstack.data.tokenizer import tokenizer_fingerprint

    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
        raise DataError(f"block_size must be an integer >= 2, got {block_size!r}")
    if not 0.0 < eval_fraction < 0.5:
        raise DataError(f"eval_fraction must be in (0, 0.5), got {eval_fraction!r}")
    documents = getattr(corpus, "documents", None)
    if documents is None:
        raise DataError(f"pack_corpus expects a Corpus, got {type(corpus).__name__}")
    stream = tokenize_documents(documents, tokenizer, progress=progress)
    n_blocks = len(stream) // block_size
    if n_blocks < 2:
        raise DataError(f"{corpus.name}: {len(stream)} tokens make {n_blocks} block(s) of {block_size}; "
                        "need at least 2 (one train, one eval): add data or lower data.block_size")
    blocks = torch.from_numpy(stream[: n_blocks * block_size].reshape(n_blocks, block_size).copy())
    train_idx, eval_idx = split_indices(n_blocks, eval_fraction=eval_fraction, seed=seed)
    payload = {"corpus": corpus.fingerprint, "tokenizer": tokenizer_fingerprint(tokenizer),
               "block_size": block_size, "eval_fraction": eval_fraction, "seed": seed, "version": 1}
    added = list(tokenizer("", split_special_tokens=True)["input_ids"])  # what it adds around a document (BOS)
    if added:  # absent when none: fingerprints of tokenizers that add nothing stay as they were
        payload["document_specials"] = added
    fingerprint = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    return PackedData(train=blocks[torch.from_numpy(train_idx)], eval=blocks[torch.from_numpy(eval_idx)],
                      fingerprint=fingerprint, block_size=block_size, num_tokens=int(len(stream)),
                      info={"corpus": corpus.name, "corpus_fingerprint": corpus.fingerprint,
                            "documents": len(documents), "blocks": n_blocks})
