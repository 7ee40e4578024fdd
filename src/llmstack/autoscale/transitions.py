"""Load transitions: ramps found afterwards in a trace, and how well a policy's predicted ramps match them.

*Needed replicas* at second ``t``: the token rate averaged over the ``smooth_s`` seconds ending at ``t``,
with headroom, over the per-replica capacity, rounded up, and never below ``floor`` (the fleet's
``min_replicas``: load the floor already covers needs no scale-up).

A *ramp* is a maximal run of seconds in which the needed replicas stand at least ``min_rise`` above their
minimum over the previous ``rise_s`` seconds; its time is the run's first second (when the extra capacity
is first needed). A rise that keeps climbing is one ramp; a level that holds for ``rise_s`` ends it, so a
later step up is a new ramp. ``rise_s`` should be of the order of a replica's start-up time: slower rises
are ones a reactive policy follows anyway.

A *predicted ramp* is a policy scale-up that the forecast asked for while the load of the moment (last bin
plus backlog) did not (:attr:`Decision.predicted_ramp`); bursts of such ticks within 1 s count once.
A prediction matches a ramp when it comes at most ``max_lead_s`` before the ramp and at most ``late_s``
after it; the lead time is the ramp time minus the earliest matching prediction. Precision: the share of
predictions that match some ramp; recall: the share of ramps matched by some prediction.

Example:
    >>> ramps = detect_ramps([0.0] * 30 + [50_000.0] * 30, capacity_tokens_per_s=10_000)
    >>> [round(r) for r in ramps]
    [30]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def needed_replicas(tokens_per_second: Sequence[float], *, capacity_tokens_per_s: float, headroom: float = 0.0,
                    smooth_s: int = 3, floor: int = 0) -> list[int]:
    """Per second: the replicas the load needs (smoothed over ``smooth_s``, with headroom, at least ``floor``)."""
    needed = []
    total = 0.0
    for i, value in enumerate(tokens_per_second):
        total += value
        if i >= smooth_s:
            total -= tokens_per_second[i - smooth_s]
        mean = total / min(i + 1, smooth_s)
        needed.append(max(floor, math.ceil(mean * (1 + headroom) / capacity_tokens_per_s - 1e-9)))
    return needed


def detect_ramps(tokens_per_second: Sequence[float], *, capacity_tokens_per_s: float, headroom: float = 0.0,
                 smooth_s: int = 3, rise_s: int = 10, min_rise: int = 1, floor: int = 0) -> list[float]:
    """Times (s) where the needed replicas start to stand ``min_rise`` above their minimum of the last ``rise_s``."""
    needed = needed_replicas(tokens_per_second, capacity_tokens_per_s=capacity_tokens_per_s, headroom=headroom,
                             smooth_s=smooth_s, floor=floor)
    ramps: list[float] = []
    rising = False
    for i, need in enumerate(needed):
        before = needed[max(0, i - rise_s): i]
        now_rising = bool(before) and need - min(before) >= min_rise
        if now_rising and not rising:
            ramps.append(float(i))
        rising = now_rising
    return ramps


def score_transitions(ramps: Sequence[float], predictions: Sequence[float], *, max_lead_s: float = 10.0,
                      late_s: float = 1.0) -> dict[str, Any]:
    """Precision and recall of ``predictions`` against ``ramps``, and the seconds ahead of matched ramps.

    Example:
        >>> score_transitions([10.0, 50.0, 90.0], [5.0, 48.0, 70.0, 91.0])["precision"]
        0.75
    """
    predictions = sorted(predictions)
    useful: set[int] = set()
    leads: list[float] = []
    for ramp in ramps:
        candidates = [i for i, p in enumerate(predictions) if ramp - max_lead_s <= p <= ramp + late_s]
        if candidates:
            leads.append(ramp - predictions[candidates[0]])
            useful.update(candidates)
    matched = len(leads)
    leads.sort()
    return {
        "ramps": len(ramps),
        "predicted": len(predictions),
        "matched_ramps": matched,
        "matched_predictions": len(useful),
        "precision": round(len(useful) / len(predictions), 4) if predictions else None,
        "recall": round(matched / len(ramps), 4) if ramps else None,
        "ahead": sum(lead > 0 for lead in leads),  # matched ramps whose first prediction came before the ramp
        "lead_s_median": round(leads[len(leads) // 2], 2) if leads else None,
        "lead_s_mean": round(sum(leads) / len(leads), 2) if leads else None,
        "max_lead_s": max_lead_s,
        "late_s": late_s,
    }


def predicted_ramp_times(decisions: Sequence[Any]) -> list[float]:
    """Times of the decisions that scaled up on the forecast (``predicted_ramp``), one per burst of ticks."""
    times: list[float] = []
    for d in decisions:
        if d.predicted_ramp and (not times or d.time - times[-1] > 1.0):
            times.append(d.time)
    return times


def scale_up_times(timeline: dict[str, Sequence[float]]) -> list[float]:
    """Seconds of a simulation timeline at which the target replica count went up (any policy)."""
    times, targets = timeline["time"], timeline["target"]
    return [float(times[i]) for i in range(1, len(targets)) if targets[i] > targets[i - 1]]
