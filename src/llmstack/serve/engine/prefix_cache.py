"""The prefix cache: KV states of full prompt blocks, reused by later prompts that start with the same tokens.

A prompt is cut into blocks of ``block`` tokens. Block ``i``'s key hashes the namespace (model
version, adapter identity and load, tokenizer) and every token up to the end of block ``i`` (a hash
chain), so a key names one exact prefix under one set of weights. Entries hold each layer's keys and
values for the block's tokens; memory is bounded in bytes, least recently used blocks go first.

Used on the engine thread only (no locking).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

BLOCK_TOKENS = 16

BlockKV = list[tuple[Any, Any]]  # per layer: keys, values [H, block, D]


@dataclass
class _Entry:
    namespace: str
    layers: BlockKV
    nbytes: int


class PrefixCache:
    """LRU store of per-layer KV states for prompt blocks, bounded by ``capacity_bytes``."""

    def __init__(self, capacity_bytes: int, *, block: int = BLOCK_TOKENS) -> None:
        self.capacity_bytes = capacity_bytes
        self.block = block
        self.nbytes = 0
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def block_keys(self, namespace: str, ids: list[int]) -> list[bytes]:
        """The keys of the full blocks of ``ids`` (a trailing partial block has none)."""
        keys, digest = [], hashlib.blake2b(namespace.encode(), digest_size=16).digest()
        for start in range(0, len(ids) - self.block + 1, self.block):
            chunk = array("q", ids[start:start + self.block]).tobytes()
            digest = hashlib.blake2b(digest + chunk, digest_size=16).digest()
            keys.append(digest)
        return keys

    def lookup(self, keys: list[bytes]) -> list[BlockKV]:
        """The entries of the longest run of ``keys`` present from the first one on (marked recently used)."""
        found = []
        for key in keys:
            entry = self._entries.get(key)
            if entry is None:
                break
            found.append(key)
        # Touch the last block first: a prefix then stays more recent than its extensions, so eviction takes
        # the tails of chains before the heads that other prompts share.
        for key in reversed(found):
            self._entries.move_to_end(key)
        return [self._entries[key].layers for key in found]

    def __contains__(self, key: bytes) -> bool:
        return key in self._entries

    def insert(self, key: bytes, namespace: str, layers: BlockKV) -> None:
        """Store one block (its tensors must not be views of a larger buffer); evicts LRU blocks to fit."""
        if key in self._entries:
            self._entries.move_to_end(key)
            return
        nbytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)
        if nbytes > self.capacity_bytes:
            return
        self._entries[key] = _Entry(namespace, layers, nbytes)
        self.nbytes += nbytes
        while self.nbytes > self.capacity_bytes:
            _, old = self._entries.popitem(last=False)
            self.nbytes -= old.nbytes

    def drop(self, namespace: str) -> int:
        """Forget every block stored under ``namespace`` (an unloaded adapter); returns how many."""
        stale = [key for key, entry in self._entries.items() if entry.namespace == namespace]
        for key in stale:
            self.nbytes -= self._entries.pop(key).nbytes
        return len(stale)
