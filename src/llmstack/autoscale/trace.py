"""Request traces: ``TIMESTAMP,ContextTokens,GeneratedTokens`` CSV files (the Azure LLM inference schema).

A :class:`Trace` holds arrival offsets (seconds from the first request) and token counts as plain lists,
so the simulator and the replay client share one validated, windowed, clipped view of the file.

Example:
    >>> trace = read_trace("../shared/traces/azure_llm_2023_code.csv")  # doctest: +SKIP
    >>> part = trace.window(start_s=600, duration_s=600).compressed(10.0)  # doctest: +SKIP
    >>> len(part), round(part.duration_s)  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import dataclasses
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from llmstack.errors import DataError

COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


class TraceError(DataError):
    """A trace file is missing, lacks a column, or has a bad row (the message names the row)."""


@dataclasses.dataclass(frozen=True)
class Trace:
    """Requests in arrival order: ``arrival_s[i]`` seconds after the first, with its token counts."""

    arrival_s: list[float]
    context_tokens: list[int]
    generated_tokens: list[int]
    source: str = "<memory>"
    clipped_context: int = 0  # requests whose prompt was shortened by :meth:`clipped`
    clipped_generated: int = 0  # requests whose output was shortened by :meth:`clipped`

    def __post_init__(self) -> None:
        if not len(self.arrival_s) == len(self.context_tokens) == len(self.generated_tokens):
            raise TraceError(f"{self.source}: columns of unequal length")

    def __len__(self) -> int:
        return len(self.arrival_s)

    @property
    def duration_s(self) -> float:
        return self.arrival_s[-1] - self.arrival_s[0] if self.arrival_s else 0.0

    def window(self, *, start_s: float = 0.0, duration_s: float | None = None,
               max_requests: int | None = None) -> Trace:
        """The requests arriving in ``[start_s, start_s + duration_s)``, re-based to start at 0."""
        end = float("inf") if duration_s is None else start_s + duration_s
        keep = [i for i, t in enumerate(self.arrival_s) if start_s <= t < end][:max_requests]
        if not keep:
            raise TraceError(f"{self.source}: no requests in the window [{start_s}, {end}) s")
        base = start_s
        return dataclasses.replace(
            self, arrival_s=[self.arrival_s[i] - base for i in keep],
            context_tokens=[self.context_tokens[i] for i in keep],
            generated_tokens=[self.generated_tokens[i] for i in keep])

    def compressed(self, speedup: float) -> Trace:
        """The same requests with inter-arrival times divided by ``speedup`` (> 1 is faster)."""
        if not speedup > 0:
            raise TraceError(f"speedup must be > 0, got {speedup}")
        return dataclasses.replace(self, arrival_s=[t / speedup for t in self.arrival_s])

    def thinned(self, keep_one_in: int) -> Trace:
        """Every ``keep_one_in``-th request (the first kept): the same bursts and gaps at 1/k of the rate.

        With :meth:`compressed` by the same factor the request rate stays the trace's own while the time runs k
        times faster: a window that fits a small machine without the overload a plain speed-up brings.
        """
        if not (isinstance(keep_one_in, int) and keep_one_in >= 1):
            raise TraceError(f"keep_one_in must be an integer >= 1, got {keep_one_in!r}")
        keep = range(0, len(self), keep_one_in)
        return dataclasses.replace(self, arrival_s=[self.arrival_s[i] for i in keep],
                                   context_tokens=[self.context_tokens[i] for i in keep],
                                   generated_tokens=[self.generated_tokens[i] for i in keep])

    def clipped(self, *, context_window: int, max_output_tokens: int | None = None) -> Trace:
        """Fit every request into a model window: output first (up to ``max_output_tokens``), then the prompt.

        The number of shortened prompts and outputs is kept in ``clipped_context`` / ``clipped_generated``.
        """
        if context_window < 2:
            raise TraceError(f"context_window must be >= 2, got {context_window}")
        out_cap = min(max_output_tokens or context_window - 1, context_window - 1)
        generated = [min(g, out_cap) for g in self.generated_tokens]
        context = [max(1, min(c, context_window - g)) for c, g in zip(self.context_tokens, generated)]
        return dataclasses.replace(
            self, context_tokens=context, generated_tokens=generated,
            clipped_context=self.clipped_context + sum(c != o for c, o in zip(context, self.context_tokens)),
            clipped_generated=self.clipped_generated + sum(g != o for g, o in zip(generated, self.generated_tokens)))

    def rate_series(self, bin_s: float) -> tuple[list[float], list[float]]:
        """Requests/s and tokens/s (prompt + output) per ``bin_s`` bin over the trace."""
        bins = int(self.duration_s // bin_s) + 1
        requests, tokens = [0.0] * bins, [0.0] * bins
        for t, c, g in zip(self.arrival_s, self.context_tokens, self.generated_tokens):
            requests[int(t // bin_s)] += 1 / bin_s
            tokens[int(t // bin_s)] += (c + g) / bin_s
        return requests, tokens


def read_trace(path: str | Path) -> Trace:
    """Read and validate a ``TIMESTAMP,ContextTokens,GeneratedTokens`` CSV into a :class:`Trace`.

    Raises:
        TraceError: missing file or column, an unparsable timestamp or count, a negative count,
            or an out-of-order arrival, naming the row (1 = the first data row).

    Example:
        >>> trace = read_trace("trace.csv")  # doctest: +SKIP
        >>> trace.arrival_s[:2], trace.context_tokens[:2]  # doctest: +SKIP
    """
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"trace file not found: {path}")
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise TraceError(f"{path}: missing column(s) {', '.join(missing)}; "
                             f"expected {','.join(COLUMNS)}, got {','.join(reader.fieldnames or []) or 'no header'}")
        stamps: list[float] = []
        context: list[int] = []
        generated: list[int] = []
        for row_number, row in enumerate(reader, start=1):
            stamps.append(_timestamp(row["TIMESTAMP"], path, row_number))
            context.append(_count(row, "ContextTokens", path, row_number))
            generated.append(_count(row, "GeneratedTokens", path, row_number))
            if len(stamps) > 1 and stamps[-1] < stamps[-2]:
                raise TraceError(f"{path}: row {row_number}: TIMESTAMP {row['TIMESTAMP']!r} is earlier than the row before")
    if not stamps:
        raise TraceError(f"{path}: no requests")
    first = stamps[0]
    return Trace([s - first for s in stamps], context, generated, source=str(path))


def _timestamp(text: str | None, path: Path, row: int) -> float:
    value = (text or "").strip()
    try:
        return float(value)  # seconds (an epoch or an offset)
    except ValueError:
        pass
    try:
        # Python's parser takes at most 6 fractional digits; the Azure traces have 7.
        head, dot, frac = value.partition(".")
        return datetime.fromisoformat(head + (dot + frac[:6] if dot else "")).timestamp()
    except ValueError:
        raise TraceError(f"{path}: row {row}: unparsable TIMESTAMP {text!r} "
                         "(expected 'YYYY-MM-DD HH:MM:SS[.fff]' or seconds)") from None


def _count(row: dict[str, str | None], column: str, path: Path, row_number: int) -> int:
    text = (row.get(column) or "").strip()
    try:
        value = int(float(text))
    except ValueError:
        raise TraceError(f"{path}: row {row_number}: {column} {text!r} is not a number") from None
    if value < 0:
        raise TraceError(f"{path}: row {row_number}: {column} must be >= 0, got {value}")
    return value


def synthetic_trace(rates: Sequence[tuple[float, float]], *, context_tokens: int = 128,
                    generated_tokens: int = 16, seed: int = 0) -> Trace:
    """A Poisson trace from ``(duration_s, requests_per_s)`` segments: ramps, bursts and idle gaps for tests.

    Example:
        >>> trace = synthetic_trace([(60, 1.0), (30, 8.0), (60, 0.0)])
        >>> 250 < len(trace) < 350  # about 60 + 240 requests
        True
    """
    import random

    rng = random.Random(seed)
    arrivals: list[float] = []
    start = 0.0
    for duration, rate in rates:
        t = start
        while rate > 0:
            t += rng.expovariate(rate)
            if t >= start + duration:
                break
            arrivals.append(t)
        start += duration
    if not arrivals:
        raise TraceError("synthetic trace has no requests (all rates are 0)")
    return Trace(arrivals, [context_tokens] * len(arrivals),
                 [generated_tokens] * len(arrivals), source="<synthetic>")
