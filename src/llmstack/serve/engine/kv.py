"""The decode KV cache: per-layer buffers with spare room, so a step writes one column instead of copying them all.

transformers' ``DynamicLayer`` concatenates each step's keys onto the whole cache (a full copy per
step, so decoding slows as sequences grow). :class:`GrowingLayer` keeps the same interface but writes
into preallocated capacity and grows it by half when full: appending is amortised O(1) per token.

With KV buckets (the compiled decode step, :mod:`.compiled`) capacity comes in fixed sizes instead, zero
filled, and a decode step may write its column at an index tensor (:attr:`GrowingLayer.column`) and read
the whole bucket: tensor shapes then stay the same while a sequence grows within a bucket.
"""

from __future__ import annotations

from typing import Any

from transformers.cache_utils import DynamicLayer

MIN_CAPACITY = 64  # tokens a fresh buffer holds


class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` whose ``keys``/``values`` are views of buffers with spare capacity along the sequence.

    Assigning ``keys``/``values`` (batch selection, merging) adopts the tensor as a full buffer.
    """

    def __init__(self, buckets: tuple[int, ...] = ()) -> None:
        self._k: Any = None  # [B, H, capacity, D]
        self._v: Any = None
        self._len = self._vlen = 0  # tokens held (values tracked apart: the two are assigned one at a time)
        self.buckets = buckets  # increasing capacities to choose from (empty: grow by half)
        self.column: Any = None  # set by a compiled decode step: [1] long tensor, where the one new token goes
        super().__init__()

    @property
    def capacity(self) -> int:
        return 0 if self._k is None else self._k.shape[-2]

    def reserve(self, total: int, like_keys: Any = None, like_values: Any = None) -> None:
        """Make room for ``total`` tokens, keeping those held (a bucket size where one fits, else 1.5x)."""
        import torch

        if self._k is not None and total <= self._k.shape[-2]:
            return
        like_keys = self._k if like_keys is None else like_keys
        like_values = self._v if like_values is None else like_values
        fitting = [b for b in self.buckets if b >= total]
        if fitting:
            capacity, alloc = fitting[0], torch.zeros  # zeros: masked columns must not hold NaN (0 * NaN = NaN)
        else:
            capacity, alloc = max(MIN_CAPACITY, total * 3 // 2), torch.empty  # amortised O(1), a third spare
        b, h, _, d = like_keys.shape
        k = alloc((b, h, capacity, d), dtype=like_keys.dtype, device=like_keys.device)
        v = alloc((b, h, capacity, like_values.shape[-1]), dtype=like_values.dtype, device=like_values.device)
        start = self._len
        if start:
            k[:, :, :start], v[:, :, :start] = self._k[:, :, :start], self._v[:, :, :start]
        self._k, self._v = k, v

    def advance(self) -> None:
        """Count the token a compiled step wrote at :attr:`column` (outside the compiled region)."""
        self._len += 1
        self._vlen = self._len

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
        if self.column is not None:  # compiled decode: fixed shapes, no Python int read (no recompilation)
            self._k.index_copy_(2, self.column, key_states)
            self._v.index_copy_(2, self.column, value_states)
            return self._k, self._v
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, new = self._len, key_states.shape[-2]
        self.reserve(start + new, key_states, value_states)
        self._k[:, :, start:start + new] = key_states
        self._v[:, :, start:start + new] = value_states
        self._len = self._vlen = start + new
        return self.keys, self.values


def new_cache(config: Any, buckets: tuple[int, ...] = ()) -> Any:
    """An empty KV cache of :class:`GrowingLayer` for a model ``config``; None when the model needs other layers
    (chunked or linear attention, shared KV): the model then builds its own cache and merging is off.

    Sliding-window layers keep every token too: the model's attention mask applies the window (it counts cache
    columns, so each row's tokens must sit in consecutive columns: see :func:`has_sliding_window`).
    ``buckets``: the capacities the layers allocate (see :class:`GrowingLayer`).
    """
    try:
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicSlidingWindowLayer

        cache = DynamicCache(config=config)
    except Exception:  # noqa: BLE001 - an older or unusual model: fall back to the model's own cache
        return None
    if not cache.layers or not all(type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) for layer in cache.layers):
        return None
    cache.layers = [GrowingLayer(buckets) for _ in cache.layers]
    return cache


def has_sliding_window(config: Any) -> bool:
    """Whether some attention layer of ``config``'s model sees only a window of recent tokens (Gemma-3, Mistral)."""
    try:
        from transformers import DynamicCache

        return any(getattr(layer, "is_sliding", False) for layer in DynamicCache(config=config).layers)
    except Exception:  # noqa: BLE001
        return False
