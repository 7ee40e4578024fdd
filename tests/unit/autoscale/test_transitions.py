"""Ramp detection and the scoring of predicted ramps, on series whose ramps are known by construction."""

from __future__ import annotations

import pytest

from llmstack.autoscale.transitions import (detect_ramps, needed_replicas, predicted_ramp_times, scale_up_times,
                                            score_transitions)

CAPACITY = 1000.0


def _series() -> list[float]:
    """Token rates per second; with capacity 1000 the needed replicas are the comments' numbers."""
    return ([500.0] * 20  # 0-19: 1
            + [2500.0] * 40  # 20-59: 3 (a step of +2 at 20, then a level that holds)
            + [3500.0] * 10  # 60-69: 4 (a step of +1 at 60)
            + [500.0] * 20  # 70-89: 1
            + [1500.0, 2500.0, 3500.0, 4500.0] + [4500.0] * 16  # 90-109: a climb 2, 3, 4, 5 (one ramp at 90)
            + [500.0] * 10 + [1500.0] + [500.0] * 19  # 110-139: 1, one second of 2 at 120
            + [0.0] * 20 + [800.0] * 20)  # 140-179: idle, then load the floor of 1 replica covers


def test_needed_replicas_smooth_round_up_and_respect_the_floor() -> None:
    assert needed_replicas([0.0, 1500.0, 1500.0, 0.0], capacity_tokens_per_s=CAPACITY, smooth_s=1) == [0, 2, 2, 0]
    assert needed_replicas([0.0, 1500.0, 1500.0, 0.0], capacity_tokens_per_s=CAPACITY, smooth_s=2,
                           floor=1) == [1, 1, 2, 1]
    assert needed_replicas([1000.0], capacity_tokens_per_s=CAPACITY, headroom=0.5) == [2]


def test_known_ramps_are_found_at_their_first_second() -> None:
    series = _series()
    args = {"capacity_tokens_per_s": CAPACITY, "smooth_s": 1, "rise_s": 10}
    assert detect_ramps(series, min_rise=1, floor=1, **args) == [20.0, 60.0, 90.0, 120.0]
    # min_rise 2: the climb at 90 counts from 91, where it first stands 2 above its minimum.
    assert detect_ramps(series, min_rise=2, floor=1, **args) == [20.0, 91.0]
    # Without the floor the rise from idle to one replica at 160 is a ramp too (with the floor it needs no scale-up).
    assert detect_ramps(series, min_rise=1, floor=0, **args) == [20.0, 60.0, 90.0, 120.0, 160.0]


def test_a_level_that_holds_ends_the_ramp_and_a_later_step_is_a_new_one() -> None:
    series = [0.0] * 10 + [2000.0] * 15 + [4000.0] * 10
    assert detect_ramps(series, capacity_tokens_per_s=CAPACITY, smooth_s=1, rise_s=10) == [10.0, 25.0]
    # Within rise_s the second step belongs to the first ramp.
    series = [0.0] * 10 + [2000.0] * 5 + [4000.0] * 10
    assert detect_ramps(series, capacity_tokens_per_s=CAPACITY, smooth_s=1, rise_s=10) == [10.0]


def test_precision_recall_and_lead_are_exact() -> None:
    ramps = [20.0, 60.0, 90.0, 120.0]
    predictions = [15.0, 58.0, 61.5, 95.0, 130.0]
    score = score_transitions(ramps, predictions, max_lead_s=10.0, late_s=1.0)
    # 15 -> ramp 20 (lead 5), 58 -> ramp 60 (lead 2); 61.5 and 95 come too late, 130 matches nothing.
    assert score["matched_ramps"] == 2 and score["matched_predictions"] == 2
    assert score["precision"] == pytest.approx(2 / 5)
    assert score["recall"] == pytest.approx(2 / 4)
    assert score["ahead"] == 2
    assert score["lead_s_mean"] == pytest.approx(3.5)
    # A looser late window takes 61.5 (for ramp 60) and 95 (for ramp 90, lead -5: not ahead).
    loose = score_transitions(ramps, predictions, max_lead_s=10.0, late_s=5.0)
    assert loose["precision"] == pytest.approx(4 / 5) and loose["recall"] == pytest.approx(3 / 4)
    assert loose["ahead"] == 2
    empty = score_transitions([], [])
    assert empty["precision"] is None and empty["recall"] is None


def test_prediction_and_scale_up_times() -> None:
    class D:
        def __init__(self, time: float, predicted_ramp: bool) -> None:
            self.time, self.predicted_ramp = time, predicted_ramp

    decisions = [D(1.0, True), D(1.5, True), D(3.0, False), D(4.0, True)]
    assert predicted_ramp_times(decisions) == [1.0, 4.0]
    timeline = {"time": [1.0, 2.0, 3.0, 4.0, 5.0], "target": [1, 2, 2, 1, 3]}
    assert scale_up_times(timeline) == [2.0, 5.0]
