"""The job-trace format: round trips and bad rows that name the row."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmstack.fleet import Job, JobTraceError, read_jobs, write_jobs

HEADER = "arrival_s,method,model_size,steps,step_s,min_workers,max_workers"


def _jobs() -> list[Job]:
    return [Job("b", 30.0, "qlora", "1.7B", steps=50, step_s=2.5, min_workers=2, max_workers=4, checkpoint_steps=10),
            Job("a", 0.0, "lora", "135M", steps=600, step_s=0.3, min_workers=1, max_workers=1, worker_slots=2)]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_round_trip_keeps_every_field_in_arrival_order(tmp_path: Path, suffix: str) -> None:
    path = write_jobs(tmp_path / f"day{suffix}", _jobs())
    assert read_jobs(path) == sorted(_jobs(), key=lambda job: job.arrival_s)


def test_optional_columns_take_defaults(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text(f"{HEADER}\n5,train,360M,20,1.5,1,2\n")
    (job,) = read_jobs(path)
    assert (job.job_id, job.checkpoint_steps, job.worker_slots, job.steps, job.step_s) == ("job-1", 100, 1, 20, 1.5)


def test_missing_column_is_named(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("arrival_s,method,model_size,steps,min_workers,max_workers\n0,lora,135M,10,1,1\n")
    with pytest.raises(JobTraceError, match="missing column.*step_s"):
        read_jobs(path)


def test_missing_key_in_jsonl_names_the_row(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    good = '{"arrival_s": 0, "method": "lora", "model_size": "135M", "steps": 5, "step_s": 1, '
    path.write_text(good + '"min_workers": 1, "max_workers": 1}\n' + good + '"min_workers": 1}\n')
    with pytest.raises(JobTraceError, match=r"row 2: missing column\(s\) max_workers"):
        read_jobs(path)


@pytest.mark.parametrize(("row", "message"), [
    ("0,lora,135M,10,-2,1,1", r"row 2: step_s must be > 0 \(a positive duration\), got -2.0"),
    ("-1,lora,135M,10,1,1,1", r"row 2: arrival_s must be >= 0"),
    ("0,lora,135M,10,1,3,2", r"row 2: max_workers \(2\) must be >= min_workers \(3\)"),
    ("0,lora,135M,10,1,0,2", r"row 2: min_workers must be >= 1"),
    ("0,sgd,135M,10,1,1,1", r"row 2: unknown method 'sgd'"),
    ("0,lora,135M,ten,1,1,1", r"row 2: steps 'ten' is not a number"),
    ("0,lora,135M,1.5,1,1,1", r"row 2: steps must be a whole number"),
])
def test_bad_row_is_named(tmp_path: Path, row: str, message: str) -> None:
    path = tmp_path / "t.csv"
    path.write_text(f"{HEADER}\n0,lora,135M,10,1,1,1\n{row}\n")
    with pytest.raises(JobTraceError, match=message):
        read_jobs(path)


def test_missing_file_and_empty_trace(tmp_path: Path) -> None:
    with pytest.raises(JobTraceError, match="not found"):
        read_jobs(tmp_path / "nope.csv")
    (tmp_path / "empty.csv").write_text(HEADER + "\n")
    with pytest.raises(JobTraceError, match="no jobs"):
        read_jobs(tmp_path / "empty.csv")
