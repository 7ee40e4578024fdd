"""The response cache: finished deterministic results, keyed by model version, adapter and request."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

from llmstack.serve.protocol import GenerationResult, SamplingParams


class ResponseCache:
    """LRU cache of finished deterministic results, keyed by model version, adapter and request."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, GenerationResult] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()

    @staticmethod
    def key(model_identity: str, adapter_identity: str | None, prompt_ids: list[int], sampling: SamplingParams,
            max_tokens: int) -> str:
        payload = f"{model_identity}|{adapter_identity}|{prompt_ids}|{sampling.model_dump_json()}|{max_tokens}"
        return hashlib.sha256(payload.encode()).hexdigest()

    def get(self, key: str) -> GenerationResult | None:
        with self._lock:
            result = self._items.get(key)
            if result is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return result

    def put(self, key: str, result: GenerationResult) -> None:
        if self.capacity <= 0:
            return
        with self._lock:
            self._items[key] = result
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

