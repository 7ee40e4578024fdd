"""The live fleet benchmark's arithmetic (llmstack.fleet.live): the trace slice, sampled node- and
worker-seconds, busy time of a stopped run, and what a node kill cost."""

from __future__ import annotations

import pytest

from llmstack.fleet import Job
from llmstack.fleet.live import busy_worker_seconds, integrate, kill_outcome, live_slice


def job(job_id: str, arrival_s: float, *, steps: int, max_workers: int) -> Job:
    return Job(job_id, arrival_s, "lora", "135M", steps=steps, step_s=1.0, min_workers=1, max_workers=max_workers)


TRACE = [job("early", 100.0, steps=600, max_workers=4), job("a", 1000.0, steps=1200, max_workers=4),
         job("b", 1060.0, steps=60, max_workers=1), job("c", 1300.0, steps=6000, max_workers=2),
         job("d", 2000.0, steps=600, max_workers=1)]
SLICE = dict(time_scale=60.0, runtime_s=(5.0, 20.0), max_workers=2, step_s=0.5, scaling_efficiency=1.0)


def test_slice_takes_consecutive_jobs_from_the_start_time_and_shrinks_them() -> None:
    rows = live_slice(TRACE, count=3, from_s=900.0, **SLICE)
    assert [r.trace_job for r in rows] == ["a", "b", "c"]
    assert [r.name for r in rows] == ["live-0", "live-1", "live-2"]
    assert [r.offset_s for r in rows] == [0.0, 1.0, 5.0]  # 60x closer
    assert [r.max_workers for r in rows] == [2, 1, 2]  # capped at 2
    # a: 1200 s on 4 workers = 300 s -> 5 s live -> 10 steps of 0.5 s; b: 60 s -> 1 s, clipped up to 5 s;
    # c: 3000 s on 2 workers -> 50 s, clipped down to 20 s -> 40 steps.
    assert [r.steps for r in rows] == [10, 10, 40]


def test_slice_refuses_a_trace_too_short_or_bad_sizes() -> None:
    with pytest.raises(ValueError, match="1 job"):
        live_slice(TRACE, count=3, from_s=1500.0, **SLICE)
    with pytest.raises(ValueError, match="step_s=0"):
        live_slice(TRACE, count=1, from_s=0.0, **{**SLICE, "step_s": 0})


def test_integrate_holds_each_sample_until_the_next_and_clips_to_the_span() -> None:
    samples = [(10.0, 3, 2), (0.0, 1, 0), (20.0, 2, 1)]  # unordered on purpose
    assert integrate(samples, start=0.0, end=30.0) == (10 * 1 + 10 * 3 + 10 * 2, 10 * 2 + 10 * 1)
    assert integrate(samples, start=15.0, end=22.0) == (5 * 3 + 2 * 2, 5 * 2 + 2 * 1)
    assert integrate(samples, start=-5.0, end=5.0) == (5.0, 0.0)  # nothing before the first sample
    assert integrate([], start=0.0, end=10.0) == (0.0, 0.0)


def test_busy_worker_seconds_counts_step_records_only() -> None:
    records = [{"step": 1, "step_time_s": 0.5, "workers": 2}, {"step": 2, "step_time_s": 1.5, "workers": 1},
               {"event": "started", "step": 2}]
    assert busy_worker_seconds(records) == pytest.approx(0.5 * 2 + 1.5)


def test_kill_outcome_picks_the_first_restart_after_the_kill() -> None:
    grow = {"resumed_from_step": 10, "last_step_seen": 12, "steps_lost": 2, "time": 50.0}
    kill = {"resumed_from_step": 30, "last_step_seen": 38, "steps_lost": 8, "time": 95.0}
    regrow = {"resumed_from_step": 40, "last_step_seen": 49, "steps_lost": 9, "time": 130.0}
    outcome = kill_outcome([grow, regrow, kill], killed_at=90.0, checkpoint_every=10)
    assert outcome["restart"] == kill and outcome["steps_lost"] == 8 and outcome["within_one_interval"]
    assert outcome["restarts"] == 3 and outcome["recovery_s"] == pytest.approx(5.0)
    assert not kill_outcome([{**kill, "steps_lost": 11}], killed_at=90.0, checkpoint_every=10)["within_one_interval"]
    nothing = kill_outcome([grow], killed_at=90.0, checkpoint_every=10)
    assert nothing["restart"] is None and nothing["steps_lost"] is None and not nothing["within_one_interval"]
    assert nothing["recovery_s"] is None

