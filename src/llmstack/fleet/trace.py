"""Job traces: one training or fine-tuning job per row, as CSV or JSON Lines.

Columns (CSV header or JSONL keys):

==============  ==========================================================================
``arrival_s``   seconds from the start of the trace when the job is submitted (>= 0)
``method``      ``train`` | ``lora`` | ``qlora`` | ``dora`` | ``bitfit`` | ``full``
``model_size``  a label such as ``135M`` or ``1.7B`` (informative; the cost is ``step_s``)
``steps``       optimizer steps to run (> 0); the global batch is the same at every worker count
``step_s``      seconds per step on one worker (> 0)
``min_workers`` fewest workers the job runs on (>= 1)
``max_workers`` most workers it can use (>= ``min_workers``); a fixed-size job asks for this many
==============  ==========================================================================

Optional: ``job_id`` (default ``job-<row>``), ``checkpoint_steps`` (steps between checkpoints,
default 100) and ``worker_slots`` (accelerators one worker needs, default 1).

Example:
    >>> jobs = [Job("a", 0.0, "lora", "135M", steps=600, step_s=1.0, min_workers=1, max_workers=4)]
    >>> write_jobs("day.csv", jobs)  # doctest: +SKIP
    >>> read_jobs("day.csv")[0].max_workers  # doctest: +SKIP
    4
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from llmstack.errors import DataError

REQUIRED_COLUMNS = ("arrival_s", "method", "model_size", "steps", "step_s", "min_workers", "max_workers")
OPTIONAL_COLUMNS = ("job_id", "checkpoint_steps", "worker_slots")
METHODS = ("train", "lora", "qlora", "dora", "bitfit", "full")


class JobTraceError(DataError):
    """A job trace is missing, lacks a column, or has a bad row (the message names the row)."""

    problems: tuple[str, ...] = ()  # a bad job's field problems, without the job or row prefix


@dataclasses.dataclass(frozen=True)
class Job:
    """One submitted training or fine-tuning run."""

    job_id: str
    arrival_s: float  # submission time, seconds from the trace start
    method: str  # train | lora | qlora | dora | bitfit | full
    model_size: str  # e.g. "135M", "1.7B"
    steps: int  # optimizer steps at the job's global batch
    step_s: float  # seconds per step on one worker
    min_workers: int  # fewest workers it runs on
    max_workers: int  # most workers it can use; a fixed-size job always asks for these
    checkpoint_steps: int = 100  # steps between checkpoints (the most an elastic job loses on a lost node)
    worker_slots: int = 1  # accelerator slots one worker takes on a node

    def __post_init__(self) -> None:
        problems = _job_problems(self)
        if problems:
            error = JobTraceError(f"job {self.job_id!r}: " + "; ".join(problems))
            error.problems = tuple(problems)
            raise error

    def runtime_s(self, workers: int, scaling_efficiency: float) -> float:
        """Seconds of stepping on ``workers`` workers (no waits, restarts or lost work)."""
        return self.steps * self.step_s / speedup(workers, scaling_efficiency)


def speedup(workers: int, scaling_efficiency: float) -> float:
    """Throughput of ``workers`` workers relative to one: each added worker adds ``scaling_efficiency`` of one.

    >>> speedup(1, 0.9), speedup(4, 0.9)
    (1.0, 3.7)
    """
    return 1.0 + (workers - 1) * scaling_efficiency


def _job_problems(job: Job) -> list[str]:
    problems = []
    if job.arrival_s < 0:
        problems.append(f"arrival_s must be >= 0, got {job.arrival_s}")
    if job.method not in METHODS:
        problems.append(f"unknown method {job.method!r}; known: {', '.join(METHODS)}")
    if job.steps <= 0:
        problems.append(f"steps must be > 0, got {job.steps}")
    if not job.step_s > 0:
        problems.append(f"step_s must be > 0 (a positive duration), got {job.step_s}")
    if job.min_workers < 1:
        problems.append(f"min_workers must be >= 1, got {job.min_workers}")
    if job.max_workers < job.min_workers:
        problems.append(f"max_workers ({job.max_workers}) must be >= min_workers ({job.min_workers})")
    if job.checkpoint_steps < 1:
        problems.append(f"checkpoint_steps must be >= 1, got {job.checkpoint_steps}")
    if job.worker_slots < 1:
        problems.append(f"worker_slots must be >= 1, got {job.worker_slots}")
    return problems


def read_jobs(path: str | Path) -> list[Job]:
    """Read and validate a job trace (``.csv``, or ``.jsonl`` / ``.json`` with one object per line).

    Jobs come back in arrival order.

    Raises:
        JobTraceError: a missing file or column, or a row with an unparsable or out-of-range value
            (a negative duration, min > max workers, ...), naming the row (1 = the first data row).
    """
    path = Path(path)
    if not path.is_file():
        raise JobTraceError(f"job trace not found: {path}")
    if path.suffix in (".jsonl", ".json"):
        rows = _jsonl_rows(path)
    else:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            _check_columns(path, reader.fieldnames or [], where="header")
            rows = list(reader)
    jobs = [_row_to_job(row, path, number) for number, row in enumerate(rows, start=1)]
    if not jobs:
        raise JobTraceError(f"{path}: no jobs")
    return sorted(jobs, key=lambda job: job.arrival_s)


def write_jobs(path: str | Path, jobs: Iterable[Job]) -> Path:
    """Write jobs as CSV (``.csv``) or JSON Lines (any other suffix); :func:`read_jobs` reads either back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = ("job_id", *REQUIRED_COLUMNS, "checkpoint_steps", "worker_slots")
    records = [{column: getattr(job, column) for column in columns} for job in jobs]
    with path.open("w", newline="", encoding="utf-8") as handle:
        if path.suffix == ".csv":
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(records)
        else:
            handle.writelines(json.dumps(record) + "\n" for record in records)
    return path


def _jsonl_rows(path: Path) -> list[Mapping[str, Any]]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise JobTraceError(f"{path}: row {number}: not JSON ({error.msg})") from None
        if not isinstance(row, dict):
            raise JobTraceError(f"{path}: row {number}: expected a JSON object, got {type(row).__name__}")
        _check_columns(path, list(row), where=f"row {number}")
        rows.append(row)
    return rows


def _check_columns(path: Path, present: Sequence[str], *, where: str) -> None:
    missing = [column for column in REQUIRED_COLUMNS if column not in present]
    if missing:
        raise JobTraceError(f"{path}: {where}: missing column(s) {', '.join(missing)}; "
                            f"required: {', '.join(REQUIRED_COLUMNS)}")


def _row_to_job(row: Mapping[str, Any], path: Path, number: int) -> Job:
    where = f"{path}: row {number}"

    def number_of(column: str, kind: type[int] | type[float], default: Any = None) -> Any:
        raw = row.get(column)
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            if default is not None:
                return default
            raise JobTraceError(f"{where}: {column} is empty")
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise JobTraceError(f"{where}: {column} {raw!r} is not a number") from None
        if kind is int and value != int(value):
            raise JobTraceError(f"{where}: {column} must be a whole number, got {raw!r}")
        return kind(value)

    fields = {
        "job_id": str(row.get("job_id") or f"job-{number}"),
        "arrival_s": number_of("arrival_s", float),
        "method": str(row.get("method") or "").strip(),
        "model_size": str(row.get("model_size") or "").strip(),
        "steps": number_of("steps", int),
        "step_s": number_of("step_s", float),
        "min_workers": number_of("min_workers", int),
        "max_workers": number_of("max_workers", int),
        "checkpoint_steps": number_of("checkpoint_steps", int, 100),
        "worker_slots": number_of("worker_slots", int, 1),
    }
    try:
        return Job(**fields)
    except JobTraceError as error:
        raise JobTraceError(f"{where}: " + "; ".join(error.problems)) from None
