"""The decode KV cache: per-layer buffers with spare room, so a step writes one column instead of copying them all.

transformers' ``DynamicLayer`` concatenates each step's keys onto the whole cache (a full copy per
step, so decoding slows as sequences grow). :class:`GrowingLayer` keeps the same interface but writes
into preallocated capacity and grows it by half when full: appending is amortised O(1) per token.
"""

from __future__ import annotations

from typing import Any

from transformers.cache_utils import DynamicLayer

MIN_CAPACITY = 64  # tokens a fresh buffer holds


class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` whose ``keys``/``values`` are views of buffers with spare capacity along the sequence.

    Assigning ``keys``/``values`` (batch selection, merging) adopts the tensor as a full buffer.
    """

    def __init__(self) -> None:
        self._k: Any = None  # [B, H, capacity, D]
        self._v: Any = None
        self._len = self._vlen = 0  # tokens held (values tracked apart: the two are assigned one at a time)
        super().__init__()

    @property  # type: ignore[override]
    def keys(self) -> Any:
        return None if self._k is None else self._k[:, :, :self._len]

    @keys.setter
    def keys(self, tensor: Any) -> None:
        self._k = tensor
        self._len = 0 if tensor is None or tensor.dim() < 4 else tensor.shape[-2]

    @property  # type: ignore[override]
    def values(self) -> Any:
        return None if self._v is None else self._v[:, :, :self._vlen]

    @values.setter
    def values(self, tensor: Any) -> None:
        self._v = tensor
        self._vlen = 0 if tensor is None or tensor.dim() < 4 else tensor.shape[-2]

    def lazy_initialization(self, key_states: Any, value_states: Any) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def fill(self, keys: Any, values: Any) -> None:
        """Start from given states (a cached prefix) instead of a forward pass's first update."""
        self.lazy_initialization(keys, values)
        self.keys, self.values = keys, values

    def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        import torch

        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, new = self._len, key_states.shape[-2]
        if self._k is None or start + new > self._k.shape[-2]:
            capacity = max(MIN_CAPACITY, (start + new) * 3 // 2)  # 1.5x: amortised O(1), a third spare at most
            b, h, _, d = key_states.shape
            k = torch.empty((b, h, capacity, d), dtype=key_states.dtype, device=key_states.device)
            v = torch.empty((b, h, capacity, value_states.shape[-1]), dtype=value_states.dtype,
                            device=value_states.device)
            if start:
                k[:, :, :start], v[:, :, :start] = self._k[:, :, :start], self._v[:, :, :start]
            self._k, self._v = k, v
        self._k[:, :, start:start + new] = key_states
        self._v[:, :, start:start + new] = value_states
        self._len = self._vlen = start + new
        return self.keys, self.values


def new_cache(config: Any) -> Any:
    """An empty KV cache of :class:`GrowingLayer` for a model ``config``; None when the model needs other layers
    (chunked or linear attention, shared KV): the model then builds its own cache and merging is off.

    Sliding-window layers keep every token too: the model's attention mask applies the window (it counts cache
    columns, so each row's tokens must sit in consecutive columns: see :func:`has_sliding_window`).
    """
    try:
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicSlidingWindowLayer

        cache = DynamicCache(config=config)
    except Exception:  # noqa: BLE001 - an older or unusual model: fall back to the model's own cache
        return None
    if not cache.layers or not all(type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) for layer in cache.layers):
        return None
    cache.layers = [GrowingLayer() for _ in cache.layers]
    return cache


def has_sliding_window(config: Any) -> bool:
    """Whether some attention layer of ``config``'s model sees only a window of recent tokens (Gemma-3, Mistral)."""
    try:
        from transformers import DynamicCache

        return any(getattr(layer, "is_sliding", False) for layer in DynamicCache(config=config).layers)
    except Exception:  # noqa: BLE001
        return False
