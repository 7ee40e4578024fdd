"""Live KPIs of each served version: errors, empty or degenerate outputs, latency and time to first token."""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


def is_degenerate(text: str, token_ids: list[int] | None = None) -> bool:
    """An empty or degenerate output: blank, one token repeated, or a run of one or two characters.

    Example:
        >>> is_degenerate(""), is_degenerate("!!!!!!!!!!!!!!!!"), is_degenerate("def add(a, b): return a + b")
        (True, True, False)
    """
    if not text.strip():
        return True
    ids = list(token_ids or [])
    if len(ids) >= 8 and Counter(ids).most_common(1)[0][1] / len(ids) >= 0.75:
        return True
    return len(text) >= 12 and len(set(text.replace(" ", ""))) <= 2


@dataclass
class Observation:
    """One finished request on one version, as the KPIs see it."""

    t: float  # when it finished
    latency: float
    ttft: float | None
    error: bool
    bad: bool
    shadow: bool = False


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


class KPIWindow:
    """Live per-version KPIs: a time window of observations, requests in flight, and totals.

    ``clock`` (monotonic seconds) is injected so the rollout logic can be tested on a fake clock.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.obs: deque[Observation] = deque()
        self.in_flight: dict[int, float] = {}  # token -> start time
        self.totals = Counter()
        self._next = 0

    def begin(self) -> int:
        self._next += 1
        self.in_flight[self._next] = self.clock()
        return self._next

    def end(self, token: int, obs: Observation | None) -> None:
        self.in_flight.pop(token, None)
        self.record(obs)

    def record(self, obs: Observation | None) -> None:
        """Book a finished request (None: cancelled by the client, not evidence either way)."""
        if obs is None:
            self.totals["cancelled"] += 1
            return
        self.obs.append(obs)
        kind = "shadow_" if obs.shadow else ""
        self.totals[kind + "requests"] += 1
        self.totals[kind + "errors"] += int(obs.error)
        self.totals[kind + "bad_outputs"] += int(obs.bad)

    def window(self, since: float, now: float, window_s: float) -> list[Observation]:
        horizon = now - 600.0
        while self.obs and self.obs[0].t < horizon:
            self.obs.popleft()
        start = max(since, now - window_s)
        return [o for o in self.obs if o.t >= start]

    @staticmethod
    def summarize(obs: list[Observation], in_flight: int = 0) -> dict[str, Any]:
        n = len(obs)
        lat = [o.latency for o in obs if not o.error]
        ttft = [o.ttft for o in obs if o.ttft is not None and not o.error]
        errors = sum(o.error for o in obs)
        bad = sum(o.bad for o in obs)
        return {"requests": n, "errors": errors, "error_rate": errors / n if n else 0.0,
                "bad_outputs": bad, "bad_output_rate": bad / n if n else 0.0,
                "p50_s": percentile(lat, 0.5), "p95_s": percentile(lat, 0.95), "ttft_p50_s": percentile(ttft, 0.5),
                "ttft_p95_s": percentile(ttft, 0.95), "in_flight": in_flight}

