"""Load transitions: ramps found afterwards in a trace, and how well a policy's predicted ramps match them.

A *ramp* is a moment where the replicas the load needs (its token rate averaged over ``smooth_s``, divided
by the per-replica capacity, with headroom) rise by at least ``min_rise`` above the most they needed over
the previous ``quiet_s``. A *predicted ramp* is a policy scale-up that the forecast asked for before the
load of the moment did. A prediction matches a ramp when it comes at most ``max_lead_s`` before it and
no later than ``late_s`` after it; the lead time is ramp time minus prediction time.

Example:
    >>> ramps = detect_ramps([0.0] * 30 + [50_000.0] * 30, capacity_tokens_per_s=10_000)
    >>> [round(r) for r in ramps]
    [30]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def detect_ramps(tokens_per_second: Sequence[float], *, capacity_tokens_per_s: float, headroom: float = 0.0,
                 smooth_s: int = 3, quiet_s: int = 30, min_rise: int = 2) -> list[float]:
    """Times (s) where the needed replicas rise by ``min_rise`` over their maximum of the last ``quiet_s``."""
    needed = []
    for i in range(len(tokens_per_second)):
        window = tokens_per_second[max(0, i - smooth_s + 1): i + 1]
        needed.append(math.ceil(sum(window) / len(window) * (1 + headroom) / capacity_tokens_per_s - 1e-9))
    ramps: list[float] = []
    for i, need in enumerate(needed):
        before = needed[max(0, i - quiet_s): i]
        if before and need - max(before) >= min_rise and (not ramps or i - ramps[-1] >= quiet_s):
            ramps.append(float(i))
    return ramps


def score_transitions(ramps: Sequence[float], predictions: Sequence[float], *, max_lead_s: float = 30.0,
                      late_s: float = 2.0) -> dict[str, Any]:
    """Precision and recall of ``predictions`` against ``ramps`` and the seconds ahead of matched ones."""
    predictions = sorted(predictions)
    matched_ramps = 0
    leads: list[float] = []
    used: set[int] = set()
    for ramp in ramps:
        candidates = [i for i, p in enumerate(predictions) if ramp - max_lead_s <= p <= ramp + late_s]
        if candidates:
            matched_ramps += 1
            first = candidates[0]
            leads.append(ramp - predictions[first])
            used.update(candidates)
    useful = len(used)
    leads.sort()
    return {
        "ramps": len(ramps),
        "predicted": len(predictions),
        "precision": round(useful / len(predictions), 4) if predictions else None,
        "recall": round(matched_ramps / len(ramps), 4) if ramps else None,
        "lead_s_median": leads[len(leads) // 2] if leads else None,
        "lead_s_mean": round(sum(leads) / len(leads), 2) if leads else None,
    }


def predicted_ramp_times(decisions: Sequence[Any]) -> list[float]:
    """Times of the decisions that scaled up on the forecast (``predicted_ramp``), one per burst of ticks."""
    times: list[float] = []
    for d in decisions:
        if d.predicted_ramp and (not times or d.time - times[-1] > 1.0):
            times.append(d.time)
    return times
