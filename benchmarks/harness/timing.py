"""Timing helpers: nearest-rank percentiles and the steady-state median of a run's step times."""

from __future__ import annotations

from llmstack.serve.loadgen import percentile as pct

__all__ = ["pct", "steady_median"]


def steady_median(values: list[float], skip: int) -> float:
    """The median (upper, for an even count) of ``values`` after the first ``skip`` warm-up ones; of all of
    them when none remain."""
    kept = sorted(values[skip:]) or sorted(values)
    return kept[len(kept) // 2]
