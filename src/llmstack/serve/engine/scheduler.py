"""Iteration-level batching: one decode loop per adapter; new groups are prefilled and merged at step boundaries."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Protocol

from llmstack.serve.engine.batch import Batch, BatchModel, StepStats
from llmstack.serve.engine.output import chunk_of
from llmstack.serve.engine.work import Work


class SchedulerModel(BatchModel, Protocol):
    """What a scheduler drives: a :class:`BatchModel`, the one thread that runs it, and a cap on rows."""

    executor: Executor
    max_batch_rows: int | None  # sequences per forward pass (None: no cap)


@dataclass(eq=False)
class Group:
    """Works admitted together (one ``@serve.batch`` call) and the queue their per-step outputs go to."""

    works: list[Work]
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.get_running_loop)
    created: float = field(default_factory=time.monotonic)

    def send(self, item: object) -> None:
        """Hand ``item`` to the group's consumer from any thread (dropped if its event loop has closed)."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass


# Admitting a group costs one prefill forward pass beside the decode steps, so a running batch takes
# newcomers in bunches: once they are a quarter of its size, or once the oldest has waited this long.
ADMIT_FRACTION = 0.25
ADMIT_WAIT_S = 0.03


class Scheduler:
    """The decode loop of one adapter: new groups are prefilled and merged into the running batch.

    The loop runs on the engine thread in slices of a few steps (one thread hop per slice, not per
    token); each step's output is handed back to the event loop with ``call_soon_threadsafe``.
    Slices are short so that other adapters' loops and adapter loads get the thread in between.
    What each step did goes to ``record`` as :class:`StepStats`, on the engine thread.
    """

    SLICE_STEPS = 8
    SLICE_S = 0.05

    def __init__(self, model: SchedulerModel, adapter: str | None, *,
                 record: Callable[[StepStats], None] = lambda stats: None) -> None:
        self.model = model
        self.adapter = adapter
        self.record = record
        self.pending: list[Group] = []  # appended on the event loop, taken on the engine thread
        self.lock = threading.Lock()
        self.groups: list[Group] = []  # engine thread only
        self.batch: Batch | None = None
        self.task: asyncio.Task | None = None
        self.epoch = 0  # bumped when a drive task fails: its slice still running stops taking new work

    def admit(self, group: Group) -> None:
        with self.lock:
            self.pending.append(group)
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._drive())

    def _busy(self) -> bool:
        with self.lock:
            return bool(self.pending) or (self.batch is not None and bool(self.batch.rows))

    async def _drive(self) -> None:
        loop = asyncio.get_running_loop()
        epoch = self.epoch
        try:
            while self._busy():
                await loop.run_in_executor(self.model.executor, self._run_slice, epoch)
        except BaseException as exc:  # noqa: BLE001 - every waiting caller gets the error
            with self.lock:
                self.epoch += 1
                pending, self.pending = self.pending, []
            # A cancelled await leaves its slice running on the engine thread: the batch is dropped
            # there, after that slice, so a later loop's first slice never meets its half-done state.
            try:
                self.model.executor.submit(self._fail, exc, pending)
            except RuntimeError:  # the executor is shut down: no slice can be running
                self._fail(exc, pending)
            if isinstance(exc, asyncio.CancelledError):
                raise

    def _fail(self, exc: BaseException, pending: list[Group]) -> None:
        waiting = self.groups + pending
        self.groups, self.batch = [], None
        for group in waiting:
            group.send(exc)

    def _run_slice(self, epoch: int) -> None:
        deadline = time.monotonic() + self.SLICE_S
        for _ in range(self.SLICE_STEPS):
            if self.epoch != epoch:  # its drive task failed or was cancelled: leave the batch to _fail
                return
            groups = self._admissible(epoch)
            if groups:
                fresh = Batch(self.model, self.adapter, [w for g in groups for w in g.works])
                stats = fresh.prefill()
                if self.batch is None or not self.batch.rows:
                    self.batch = fresh
                elif fresh.rows:
                    self.batch.merge(fresh)
                self.groups += groups
            elif self.batch is not None and self.batch.rows:
                stats = self.batch.step()
            else:
                return
            self._publish(stats)
            if time.monotonic() > deadline:
                return

    def _admissible(self, epoch: int) -> list[Group]:
        """Pending groups that fit beside the running rows (max_batch_rows); at least one if idle."""
        running = len(self.batch.rows) if self.batch is not None else 0
        if running and not self.batch.mergeable:  # type: ignore[union-attr]
            return []
        with self.lock:
            if self.epoch != epoch:  # groups pending now belong to the next drive task
                return []
            if running and self.pending:
                waiting = sum(w.request.sampling.n for g in self.pending for w in g.works)
                if waiting < ADMIT_FRACTION * running and time.monotonic() - self.pending[0].created < ADMIT_WAIT_S:
                    return []
            cap = self.model.max_batch_rows
            taken: list[Group] = []
            for group in self.pending:
                size = sum(w.request.sampling.n for w in group.works)
                if cap is not None and running + size > cap and (running or taken):
                    break
                taken.append(group)
                running += size
            self.pending = self.pending[len(taken):]
        return taken

    def _publish(self, stats: StepStats) -> None:
        """Record the step's ``stats`` (works that ended cancelled included), then send each group its works'
        new text; forget groups whose works have all finished."""
        now = time.time()
        sends = []
        for group in self.groups:
            outputs: list[object] = []
            for work in group.works:
                if work.reported:
                    outputs.append(StopIteration)
                    continue
                outputs.append(chunk_of(self.model.tokenizer, work, now))
                stats.cancelled += work.reported and work.cancelled
            sends.append((group, outputs))
        self.record(stats)  # before any caller can see the step's last chunk
        for group, outputs in sends:
            group.send(outputs)
        self.groups = [group for group in self.groups if not all(w.reported for w in group.works)]

