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
