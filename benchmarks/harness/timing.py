"""Timing helpers: percentiles, steady-state means, a wall-clock stopwatch."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from llmstack.serve.loadgen import percentile as pct

__all__ = ["Stopwatch", "pct", "steady_median", "timed"]


def steady_median(values: list[float], skip: int) -> float:
    """The median (upper, for an even count) of ``values`` after the first ``skip`` warm-up ones; of all of
    them when none remain."""
    kept = sorted(values[skip:]) or sorted(values)
    return kept[len(kept) // 2]


def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """``fn(*args, **kwargs)`` and the wall seconds it took."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


class Stopwatch:
    """``with Stopwatch() as sw: ...`` then ``sw.seconds``."""

    seconds: float = 0.0

    def __enter__(self) -> Stopwatch:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds = time.perf_counter() - self._start
