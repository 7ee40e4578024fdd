"""The driver's metrics history: restarts are recorded even when the lost steps' records never arrived."""

from __future__ import annotations

from pathlib import Path

import fsspec

from llmstack.train.progress import MetricsLog


def steps(*numbers: int) -> list[dict]:
    return [{"step": n, "loss": 1.0 / n} for n in numbers]


def log_in(tmp_path: Path, resuming: bool | None) -> MetricsLog:
    return MetricsLog(fsspec.filesystem("file"), str(tmp_path), total=8, show=False, resuming=resuming)


def test_a_restart_whose_last_records_were_lost_is_still_a_recovery(tmp_path: Path) -> None:
    log = log_in(tmp_path, resuming=False)
    # Steps 4 and 5 ran, but rank 0 was torn down before their records reached the driver.
    log.consume(steps(1, 2, 3) + [{"event": "resumed", "step": 3}] + steps(4, 5, 6, 7, 8))
    assert log.recoveries == [{"resumed_from_step": 3, "last_step_seen": 3, "steps_lost": 0}]
    assert log.initial_resume is None and [r["step"] for r in log.history] == list(range(1, 9))


def test_a_restart_before_any_record_arrived_is_a_recovery_on_a_fresh_run(tmp_path: Path) -> None:
    log = log_in(tmp_path, resuming=False)
    log.consume([{"event": "resumed", "step": 3}] + steps(4, 5))
    assert len(log.recoveries) == 1 and log.initial_resume is None


def test_a_rerun_of_the_run_name_starts_from_its_checkpoint_then_counts_restarts(tmp_path: Path) -> None:
    log = log_in(tmp_path, resuming=True)
    log.consume([{"event": "resumed", "step": 4}] + steps(5, 6) + [{"event": "resumed", "step": 4}] + steps(5, 6))
    assert log.initial_resume == 4
    assert log.recoveries == [{"resumed_from_step": 4, "last_step_seen": 6, "steps_lost": 2}]
