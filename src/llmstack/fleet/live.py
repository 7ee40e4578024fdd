"""The live fleet benchmark's arithmetic: a trace slice shrunk to a local cluster, and the figures of a run on it.

No Ray here: ``benchmarks/fleet_bench.py --part live`` runs the slice on
:func:`llmstack.fleet.local_cluster.local_autoscaling_cluster`, samples alive nodes and Train workers once a
second, and turns the samples, the runs' step records and their restarts into figures with these functions.

Example:
    >>> integrate([(0.0, 1, 0), (10.0, 3, 2), (20.0, 2, 2)], start=5.0, end=25.0)
    (45.0, 30.0)
    >>> kill_outcome([{"resumed_from_step": 10, "last_step_seen": 14, "steps_lost": 4, "time": 50.0}],
    ...              killed_at=40.0, checkpoint_every=10)["within_one_interval"]
    True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from llmstack.fleet.trace import Job, speedup


@dataclasses.dataclass(frozen=True)
class LiveJob:
    """One trace job shrunk to the local cluster."""

    name: str  # the run's name (its registry entry)
    trace_job: str  # the trace row it stands for
    offset_s: float  # submission, seconds after the slice's first job
    max_workers: int  # a fixed run asks for these; an elastic one for [1, max_workers]
    steps: int  # optimizer steps at the run's global batch


def live_slice(jobs: Sequence[Job], *, count: int, from_s: float, time_scale: float,
               runtime_s: tuple[float, float], max_workers: int, step_s: float,
               scaling_efficiency: float) -> list[LiveJob]:
    """``count`` consecutive trace jobs from ``from_s``, shrunk for a local cluster.

    Arrivals come ``time_scale`` times closer; workers are capped at ``max_workers``; a job's run time on its
    (capped) max workers is the trace's divided by ``time_scale`` and clipped to ``runtime_s``; its steps are
    that run time over ``step_s``, the live step's seconds on max workers (its global batch is fixed, so a step
    on fewer workers takes proportionally longer).
    """
    if count < 1 or step_s <= 0 or time_scale <= 0 or not 0 < runtime_s[0] <= runtime_s[1]:
        raise ValueError(f"need count >= 1, step_s > 0, time_scale > 0 and 0 < runtime_s[0] <= runtime_s[1]; got "
                         f"count={count}, step_s={step_s}, time_scale={time_scale}, runtime_s={runtime_s}")
    picked = sorted((job for job in jobs if job.arrival_s >= from_s), key=lambda job: job.arrival_s)[:count]
    if len(picked) < count:
        raise ValueError(f"the trace has {len(picked)} job(s) from {from_s:.0f} s, {count} asked for")
    first = picked[0].arrival_s
    rows = []
    for index, job in enumerate(picked):
        workers = min(job.max_workers, max_workers)
        seconds = job.steps * job.step_s / speedup(job.max_workers, scaling_efficiency) / time_scale
        seconds = min(max(seconds, runtime_s[0]), runtime_s[1])
        rows.append(LiveJob(f"live-{index}", job.job_id, (job.arrival_s - first) / time_scale, workers,
                            max(1, round(seconds / step_s))))
    return rows


def integrate(samples: Sequence[tuple[float, int, int]], *, start: float, end: float) -> tuple[float, float]:
    """Node-seconds and worker-seconds between ``start`` and ``end`` of ``(time, nodes, workers)`` samples.

    Each sample's counts hold until the next sample (the last one's until ``end``); before the first sample
    nothing is counted.
    """
    ordered = sorted(samples)
    node_s = worker_s = 0.0
    for (at, nodes, workers), until in zip(ordered, [s[0] for s in ordered[1:]] + [end]):
        held = max(0.0, min(until, end) - max(at, start))
        node_s += held * nodes
        worker_s += held * workers
    return node_s, worker_s


def busy_worker_seconds(records: Iterable[Mapping[str, Any]]) -> float:
    """Seconds inside optimizer steps x workers over a run's step records (its ``metrics.jsonl``).

    The file keeps the final history, so steps a restart replayed count once: for a run that finished, the
    registry's ``busy_worker_seconds`` (every step that ran, lost ones included) is the figure; this is the one
    for a run stopped before it finished.
    """
    return sum(float(r["step_time_s"]) * int(r.get("workers", 1)) for r in records if "step_time_s" in r)


def kill_outcome(recoveries: Sequence[Mapping[str, Any]], *, killed_at: float,
                 checkpoint_every: int) -> dict[str, Any]:
    """What killing a node at ``killed_at`` (epoch s) cost the elastic run that used it.

    ``recoveries`` are the run's worker-group restarts (the registry manifest's ``recoveries``, each with the
    ``time`` its new group started); the kill's is the first one after ``killed_at``. Returns the steps that
    restart lost, the checkpoint interval, whether the loss stayed within one interval and ``recovery_s``, the
    seconds from the kill to the new worker group's start; ``restart`` is
    ``None`` when no restart followed the kill (the run ended first, or the node held none of its workers).
    """
    after = sorted((r for r in recoveries if float(r.get("time", 0.0)) >= killed_at), key=lambda r: r["time"])
    restart = dict(after[0]) if after else None
    steps_lost = int(restart["steps_lost"]) if restart else None
    return {"killed_at": killed_at, "checkpoint_every": checkpoint_every, "restart": restart,
            "steps_lost": steps_lost, "within_one_interval": steps_lost is not None and steps_lost <= checkpoint_every,
            "recovery_s": float(restart["time"]) - killed_at if restart else None, "restarts": len(recoveries)}


__all__ = ["LiveJob", "busy_worker_seconds", "integrate", "kill_outcome", "live_slice"]
