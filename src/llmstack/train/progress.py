"""Metrics on the driver: a progress bar, ``metrics.jsonl`` and a loss-curve PNG in the run directory.

Rank 0 pushes one record per step to a small metrics actor (fire and forget); a driver thread
drains it while ``trainer.fit()`` blocks. Each time a worker group starts, rank 0
sends ``{"event": "started", "step": s}`` (``s``: the checkpoint step it restored, 0 for none). Every
start after the first is a restart: the history is cut back to step ``s`` (the replayed steps replace
the lost ones) and the restart is recorded in :attr:`MetricsLog.recoveries`.
"""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Callable
from typing import Any


class MetricsBus:
    """A tiny Ray actor (0 CPUs) buffering per-step records for the driver."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def push(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    def drain(self) -> list[dict[str, Any]]:
        records, self.records = self.records, []
        return records


def start_bus() -> Any:
    """The metrics actor, on the driver's node: a worker node an elastic run loses must not take it along."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    return ray.remote(num_cpus=0, scheduling_strategy=here)(MetricsBus).remote()


class MetricsLog:
    """History of per-step records, mirrored to ``<run_dir>/metrics.jsonl`` and a tqdm bar.

    Args:
        fs: fsspec filesystem of the run directory.
        run_path: the run directory (fs path).
        total: optimizer steps of the run (progress bar length).
        desc: progress bar label.
        show: draw the progress bar.
        on_record: called with each per-step record as it arrives (e.g. to feed Ray Tune).
    """

    def __init__(self, fs: Any, run_path: str, *, total: int, desc: str = "train", show: bool = True,
                 on_record: Callable[[dict[str, Any]], None] | None = None) -> None:
        from tqdm.auto import tqdm

        self.fs = fs
        self.on_record = on_record
        self.run_path = run_path.rstrip("/")
        self.history: list[dict[str, Any]] = self._read_existing()
        self.recoveries: list[dict[str, Any]] = []
        self.initial_resume: int | None = None  # checkpoint step this call started from (rerun of a run name)
        self._starts = 0  # worker-group starts seen: the first one, then one per restart
        self.worker_groups: list[dict[str, Any]] = []  # each start: {"time", "workers", "step"}
        self.busy_worker_seconds = 0.0  # sum of step time x workers over every step that arrived (replays too)
        self._max_step = max((r.get("step", 0) for r in self.history), default=0)
        self._lock = threading.Lock()
        self.bar = tqdm(total=total, desc=desc, unit="step", disable=not show, dynamic_ncols=True)

    @property
    def jsonl_path(self) -> str:
        return f"{self.run_path}/metrics.jsonl"

    @property
    def plot_path(self) -> str:
        return f"{self.run_path}/loss_curve.png"

    def _read_existing(self) -> list[dict[str, Any]]:
        try:
            with self.fs.open(self.jsonl_path, "r") as handle:
                return [json.loads(line) for line in handle if line.strip()]
        except (FileNotFoundError, OSError, json.JSONDecodeError):
            return []

    def consume(self, records: list[dict[str, Any]]) -> None:
        with self._lock:
            for record in records:
                if record.get("event") == "started":
                    step = int(record["step"])
                    self._starts += 1
                    if "time" in record:
                        self.worker_groups.append({"time": float(record["time"]), "workers": int(record["workers"]),
                                                   "step": step})
                    if self._starts == 1:
                        self.initial_resume = step or None
                    else:
                        # A restart, from a checkpoint or from scratch. The lost steps' records may never have
                        # arrived (rank 0 is torn down with the group): steps lost can be undercounted, never the restart.
                        recovery = {"resumed_from_step": step, "last_step_seen": self._max_step,
                                    "steps_lost": max(0, self._max_step - step)}
                        if "time" in record:  # when the new group started (epoch s): which event caused it
                            recovery["time"] = float(record["time"])
                        self.recoveries.append(recovery)
                    self.history = [r for r in self.history if r.get("step", 0) <= step]
                    self._max_step = step
                    self.bar.n = step
                    self.bar.refresh()
                    continue
                step = int(record["step"])
                self.busy_worker_seconds += float(record.get("step_time_s", 0.0)) * int(record.get("workers", 1))
                self.history = [r for r in self.history if r.get("step", 0) < step]
                self.history.append(record)
                self._max_step = max(self._max_step, step)
                self.bar.n = step
                postfix = {"loss": f"{record['loss']:.3f}"}
                if "eval_loss" in record:
                    postfix["eval"] = f"{record['eval_loss']:.3f}"
                self.bar.set_postfix(postfix, refresh=False)
                self.bar.refresh()
                if self.on_record is not None:
                    try:
                        self.on_record(record)
                    except Exception as exc:  # a caller's hook must not break the metrics history
                        self.bar.write(f"llmstack: on_record hook failed: {type(exc).__name__}: {exc}")

    def write(self) -> None:
        """Rewrite ``metrics.jsonl`` (small: one line per step)."""
        with self._lock:
            text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.history)
        with self.fs.open(self.jsonl_path, "w") as handle:
            handle.write(text)

    def plot(self) -> None:
        """Draw train loss per step and eval loss at eval steps into ``loss_curve.png``."""
        if not self.history:
            return
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.figure import Figure

        figure = Figure(figsize=(7, 4), dpi=110)
        axes = figure.subplots()
        steps = [r["step"] for r in self.history]
        axes.plot(steps, [r["loss"] for r in self.history], label="train loss", linewidth=1.2)
        evals = [(r["step"], r["eval_loss"]) for r in self.history if "eval_loss" in r]
        if evals:
            axes.plot(*zip(*evals), "o-", label="eval loss", markersize=4)
        for recovery in self.recoveries:
            axes.axvline(recovery["resumed_from_step"], color="grey", linestyle=":", linewidth=1)
        axes.set_xlabel("optimizer step")
        axes.set_ylabel("loss (nats/token)")
        axes.grid(alpha=0.3)
        axes.legend()
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png")
        with self.fs.open(self.plot_path, "wb") as handle:
            handle.write(buffer.getvalue())

    def close(self) -> None:
        self.bar.close()


def worker_usage(worker_groups: list[dict[str, Any]], *, busy_worker_seconds: float, ended_at: float,
                 queued_since: float) -> dict[str, float]:
    """What a run's workers did: held, busy and how long the run queued before its first worker group.

    Args:
        worker_groups: each worker group's start ``{"time": epoch s, "workers": n}``, in order; a group
            holds its workers until the next one starts (or ``ended_at``).
        busy_worker_seconds: time inside optimizer steps x workers.
        ended_at: epoch seconds the run ended.
        queued_since: epoch seconds the run was submitted (a Ray Job) or asked for workers.

    Returns:
        ``worker_seconds``, ``busy_worker_seconds``, ``worker_utilisation`` (busy / held) and
        ``queue_wait_s`` (first worker group's start - ``queued_since``); empty without any group.

    Example:
        >>> worker_usage([{"time": 10.0, "workers": 1}, {"time": 20.0, "workers": 2}], busy_worker_seconds=24.0,
        ...              ended_at=30.0, queued_since=4.0)
        {'worker_seconds': 30.0, 'busy_worker_seconds': 24.0, 'worker_utilisation': 0.8, 'queue_wait_s': 6.0}
    """
    if not worker_groups:
        return {}
    groups = sorted(worker_groups, key=lambda g: g["time"])
    ends = [g["time"] for g in groups[1:]] + [max(ended_at, groups[-1]["time"])]
    held = sum((end - g["time"]) * g["workers"] for g, end in zip(groups, ends))
    return {"worker_seconds": round(held, 3), "busy_worker_seconds": round(busy_worker_seconds, 3),
            "worker_utilisation": round(busy_worker_seconds / held, 4) if held > 0 else 0.0,
            "queue_wait_s": round(max(0.0, groups[0]["time"] - queued_since), 3)}


class Pump:
    """Background thread moving records from the bus into a :class:`MetricsLog` while fit() blocks."""

    def __init__(self, bus: Any, log: MetricsLog, *, interval_s: float = 0.5, write_every_s: float = 10.0) -> None:
        self.bus, self.log = bus, log
        self.interval_s, self.write_every_s = interval_s, write_every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="llmstack-metrics", daemon=True)

    def __enter__(self) -> Pump:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.drain()

    def drain(self) -> None:
        import ray

        try:
            self.log.consume(ray.get(self.bus.drain.remote(), timeout=30))
        except Exception:  # the bus is best effort; checkpoints and Ray's result are authoritative
            pass

    def _run(self) -> None:
        import time

        last_write = time.monotonic()
        while not self._stop.wait(self.interval_s):
            self.drain()
            if time.monotonic() - last_write > self.write_every_s:
                try:
                    self.log.write()
                except Exception:
                    pass
                last_write = time.monotonic()
