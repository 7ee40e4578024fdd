"""The driver's metrics history: every worker-group restart is recorded, even from scratch or with the lost
steps' records never delivered."""

from __future__ import annotations

from pathlib import Path

import fsspec

from llmstack.train.progress import MetricsLog


def steps(*numbers: int) -> list[dict]:
    return [{"step": n, "loss": 1.0 / n} for n in numbers]


def started(step: int) -> dict:
    return {"event": "started", "step": step}


def new_log(tmp_path: Path) -> MetricsLog:
    return MetricsLog(fsspec.filesystem("file"), str(tmp_path), total=8, show=False)


def test_a_restart_from_a_checkpoint_cuts_the_history_back_and_is_recorded(tmp_path: Path) -> None:
    log = new_log(tmp_path)
    log.consume([started(0), *steps(1, 2, 3, 4, 5), started(3), *steps(4, 5, 6, 7, 8)])
    assert log.recoveries == [{"resumed_from_step": 3, "last_step_seen": 5, "steps_lost": 2}]
    assert log.initial_resume is None and [r["step"] for r in log.history] == list(range(1, 9))


def test_a_restart_whose_last_records_were_lost_is_still_a_recovery(tmp_path: Path) -> None:
    log = new_log(tmp_path)
    # Steps 4 and 5 ran, but rank 0 was torn down before their records reached the driver.
    log.consume([started(0), *steps(1, 2, 3), started(3), *steps(4, 5)])
    assert log.recoveries == [{"resumed_from_step": 3, "last_step_seen": 3, "steps_lost": 0}]


def test_a_restart_from_scratch_is_a_recovery_that_lost_every_step(tmp_path: Path) -> None:
    log = new_log(tmp_path)
    log.consume([started(0), *steps(1, 2, 3, 4, 5), started(0), *steps(1, 2, 3, 4, 5, 6, 7, 8)])
    assert log.recoveries == [{"resumed_from_step": 0, "last_step_seen": 5, "steps_lost": 5}]
    assert [r["step"] for r in log.history] == list(range(1, 9))


def test_a_rerun_of_the_run_name_starts_from_its_checkpoint_without_a_recovery(tmp_path: Path) -> None:
    log = new_log(tmp_path)
    log.consume([started(4), *steps(5, 6)])
    assert log.initial_resume == 4 and log.recoveries == []


def test_worker_usage_counts_held_and_busy_worker_seconds_across_a_resize(tmp_path: Path) -> None:
    from llmstack.train.progress import worker_usage

    log = new_log(tmp_path)
    # One worker from t=100 for two 3 s steps, then a group of two from t=110 for two 2 s steps.
    log.consume([{"event": "started", "step": 0, "time": 100.0, "workers": 1},
                 *({"step": n, "loss": 1.0, "step_time_s": 3.0, "workers": 1} for n in (1, 2)),
                 {"event": "started", "step": 2, "time": 110.0, "workers": 2},
                 *({"step": n, "loss": 1.0, "step_time_s": 2.0, "workers": 2} for n in (3, 4))])
    assert log.busy_worker_seconds == 3.0 * 2 + 2.0 * 2 * 2
    usage = worker_usage(log.worker_groups, busy_worker_seconds=log.busy_worker_seconds, ended_at=120.0,
                         queued_since=95.0)
    assert usage["worker_seconds"] == 10.0 * 1 + 10.0 * 2
    assert usage["worker_utilisation"] == round(14.0 / 30.0, 4)
    assert usage["queue_wait_s"] == 5.0
    assert worker_usage([], busy_worker_seconds=0.0, ended_at=1.0, queued_since=0.0) == {}


def test_a_recovery_records_when_its_new_worker_group_started(tmp_path: Path) -> None:
    # The live fleet bench tells the restart a node kill caused from earlier ones by this time.
    log = new_log(tmp_path)
    log.consume([{"event": "started", "step": 0, "time": 100.0, "workers": 2}, *steps(1, 2, 3, 4, 5, 6, 7),
                 {"event": "started", "step": 5, "time": 130.0, "workers": 1}])
    assert log.recoveries == [{"resumed_from_step": 5, "last_step_seen": 7, "steps_lost": 2, "time": 130.0}]
