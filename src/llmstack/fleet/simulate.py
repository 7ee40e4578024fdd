"""A fleet simulator: a day of training jobs through an autoscaling cluster's scaling rules, in seconds.

The clock advances in ``tick_s`` steps. Each tick, in this order:

1. nodes whose start-up delay has passed join the cluster; scheduled node losses take a node away;
2. arrived jobs join the queue; queued jobs start in arrival order wherever they fit (later jobs
   backfill, as pending Ray placement groups do): a **fixed** job only with its whole set of
   ``max_workers`` bundles, an **elastic** job with as many as are free once that is ``>= min_workers``;
3. an elastic job below ``max_workers`` that stands at a checkpoint grows onto free slots (Ray Train
   restarts its worker group from that checkpoint: ``restart_s`` without stepping); with ``consolidate``,
   an elastic job at a checkpoint that has workers on the *drain target* (the up node with the fewest busy
   slots, when the other busy nodes have room for all of them) restarts them there instead, so that node
   empties and the idle timeout takes it (live, a node drain: Ray Train's preemption notice, a checkpoint,
   and the worker group restarted on the other nodes);
4. every ``autoscaler_interval_s`` the autoscaler (Ray's rules, as in its resource-demand scheduler)
   bin-packs the pending bundles (queued jobs' bundles and the missing ones of elastic jobs below
   their max: Ray Train's elastic policy requests ``max_workers``) first onto free slots of up and
   starting nodes, then onto new nodes of the node type that fits the most of them, up to each type's
   ``max_nodes``; nodes with no worker for ``idle_timeout_s`` are removed down to ``min_nodes`` (not
   those whose free slots that packing counted on);
5. the tick's node-seconds are charged, then running jobs step at ``speedup(workers) / step_s`` steps
   per second and checkpoint every ``checkpoint_steps``; an elastic job that could grow stops at the
   boundary it crosses.

A lost node sends each job on it back to its last checkpoint (at most ``checkpoint_steps`` of work);
an elastic job left with ``>= min_workers`` goes on with fewer after ``restart_s``, any other job
returns to the queue keeping its checkpoint.

Example:
    >>> from llmstack.fleet import Job, NodeType, ClusterSetup, simulate
    >>> jobs = [Job("a", 0.0, "lora", "135M", steps=100, step_s=1.0, min_workers=1, max_workers=1)]
    >>> setup = ClusterSetup("auto", (NodeType("n", worker_slots=1, max_nodes=1),), startup_s=60)
    >>> result = simulate(jobs, setup)
    >>> result.jobs[0].queue_wait_s, result.jobs[0].completion_s
    (60.0, 160.0)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from llmstack.errors import ConfigError, ResourceError
from llmstack.fleet.trace import Job, speedup

_EPSILON = 1e-9
_GIVE_UP_AFTER_S = 365 * 86_400.0  # past the horizon: a setup that never drains is a bug, not a slow day


@dataclasses.dataclass(frozen=True)
class NodeType:
    """A kind of node the autoscaler can launch (a Ray ``available_node_types`` entry)."""

    name: str
    worker_slots: int  # accelerators per node (a worker takes Job.worker_slots of them)
    max_nodes: int  # most nodes of this type
    min_nodes: int = 0  # nodes of this type kept even when idle (a static cluster: min_nodes == max_nodes)

    def __post_init__(self) -> None:
        if self.worker_slots < 1 or self.max_nodes < 0 or not 0 <= self.min_nodes <= self.max_nodes:
            raise ConfigError(f"node type {self.name!r}: need worker_slots >= 1 and 0 <= min_nodes <= max_nodes, "
                              f"got worker_slots={self.worker_slots}, min_nodes={self.min_nodes}, "
                              f"max_nodes={self.max_nodes}")


@dataclasses.dataclass(frozen=True)
class ClusterSetup:
    """One policy to compare: the node types, whether the cluster scales and whether jobs are elastic."""

    name: str
    node_types: tuple[NodeType, ...]
    autoscaling: bool = True  # False: every type starts (and stays) at max_nodes, already up at t=0
    elastic: bool = False  # jobs run on [min_workers, max_workers]; False: always max_workers, all at once
    startup_s: float = 120.0  # from the autoscaler's launch to the node joining
    idle_timeout_s: float = 300.0  # Ray's idle_timeout_minutes default is 5
    autoscaler_interval_s: float = 5.0  # Ray's autoscaler update interval
    restart_s: float = 0.0  # worker-group (re)start before the first step after a start, grow or shrink
    consolidate: bool = False  # elastic jobs leave the emptiest busy node at checkpoints (needs elastic)
    scaling_efficiency: float = 0.9  # each added worker adds this fraction of one worker's throughput
    tick_s: float = 1.0
    sample_s: float = 60.0  # time-series resolution
    horizon_s: float = 0.0  # run at least this long (a day: 86400) even when the jobs finish earlier

    def __post_init__(self) -> None:
        if not self.node_types:
            raise ConfigError("a cluster setup needs at least one node type")
        if not (self.tick_s > 0 and self.sample_s > 0 and self.autoscaler_interval_s > 0):
            raise ConfigError("tick_s, sample_s and autoscaler_interval_s must be > 0")
        if not 0 < self.scaling_efficiency <= 1:
            raise ConfigError(f"scaling_efficiency must be in (0, 1], got {self.scaling_efficiency}")
        if self.consolidate and not (self.elastic and self.autoscaling):
            raise ConfigError(f"setup {self.name!r}: consolidate=True moves elastic workers so that the autoscaler "
                              f"can remove a node; set elastic=True and autoscaling=True, got "
                              f"elastic={self.elastic}, autoscaling={self.autoscaling}")


@dataclasses.dataclass
class JobOutcome:
    """What happened to one job."""

    job_id: str
    arrival_s: float
    first_start_s: float | None = None
    finish_s: float | None = None
    lost_steps: float = 0.0  # steps redone after node losses
    resizes: int = 0  # elastic grows and shrinks
    moves: int = 0  # restarts that moved workers off a drained node (consolidation)
    workers_seen: list[int] = dataclasses.field(default_factory=list)  # worker count at each (re)start

    @property
    def queue_wait_s(self) -> float | None:
        return None if self.first_start_s is None else self.first_start_s - self.arrival_s

    @property
    def completion_s(self) -> float | None:
        return None if self.finish_s is None else self.finish_s - self.arrival_s


@dataclasses.dataclass
class FleetResult:
    """Totals, per-job outcomes and time series of one simulated run."""

    setup: str
    end_s: float
    node_s: float  # node-seconds provisioned (start-up included: a booting node is paid for)
    idle_node_s: float  # node-seconds with no worker on the node (booting included)
    provisioned_slot_s: float  # accelerator-slot-seconds provisioned
    busy_worker_s: float  # worker-seconds spent stepping
    busy_slot_s: float  # accelerator-slot-seconds spent stepping
    jobs: list[JobOutcome]
    series: dict[str, list[float]]  # t_s, nodes, ready_nodes, busy_workers, queued_jobs, running_jobs
    booting_node_s: float = 0.0  # node-seconds between launch and joining (part of idle_node_s)
    restarting_slot_s: float = 0.0  # slot-seconds held by worker groups (re)starting, not stepping

    @property
    def utilisation(self) -> float:
        """Busy slot-seconds over provisioned slot-seconds."""
        return self.busy_slot_s / self.provisioned_slot_s if self.provisioned_slot_s else 0.0

    def summary(self) -> dict[str, Any]:
        """The headline figures (times in seconds), JSON-ready."""
        done = [job for job in self.jobs if job.finish_s is not None]
        completion = sorted(job.completion_s for job in done)  # type: ignore[misc]
        waits = sorted(job.queue_wait_s for job in done)  # type: ignore[misc]
        return {
            "setup": self.setup, "jobs": len(self.jobs), "jobs_done": len(done), "end_s": self.end_s,
            "node_s": self.node_s, "idle_node_s": self.idle_node_s, "busy_worker_s": self.busy_worker_s,
            "provisioned_slot_s": self.provisioned_slot_s, "busy_slot_s": self.busy_slot_s,
            "booting_node_s": self.booting_node_s, "restarting_slot_s": self.restarting_slot_s,
            "utilisation": self.utilisation,
            "completion_median_s": _quantile(completion, 0.5), "completion_p95_s": _quantile(completion, 0.95),
            "queue_wait_median_s": _quantile(waits, 0.5), "queue_wait_p95_s": _quantile(waits, 0.95),
            "lost_steps": sum(job.lost_steps for job in self.jobs),
            "resizes": sum(job.resizes for job in self.jobs),
            "moves": sum(job.moves for job in self.jobs),
        }


def _quantile(ordered: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of sorted values (nan for none)."""
    if not ordered:
        return math.nan
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclasses.dataclass
class _Node:
    node_id: int
    node_type: NodeType
    launched_s: float
    ready_s: float
    used_slots: int = 0
    idle_since_s: float = 0.0

    @property
    def free_slots(self) -> int:
        return self.node_type.worker_slots - self.used_slots


@dataclasses.dataclass
class _RunningJob:
    job: Job
    outcome: JobOutcome
    workers: list[int] = dataclasses.field(default_factory=list)  # node id of each worker
    steps_done: float = 0.0
    checkpoint_step: float = 0.0
    stepping_from_s: float = 0.0  # (re)start finishes: no steps before this
    at_boundary: bool = False  # stopped at a checkpoint to grow or move


def check_fits(jobs: Sequence[Job], setup: ClusterSetup) -> None:
    """Refuse jobs that could never run on the setup's node types (the message names the resources).

    Raises:
        ResourceError: a worker larger than every node type, or more workers than the largest cluster holds.
    """
    problems = []
    for job in jobs:
        fitting = [t for t in setup.node_types if t.worker_slots >= job.worker_slots and t.max_nodes > 0]
        needed = job.min_workers if setup.elastic else job.max_workers
        capacity = sum((t.worker_slots // job.worker_slots) * t.max_nodes for t in fitting)
        if not fitting:
            problems.append(f"job {job.job_id!r}: a worker needs {job.worker_slots} slot(s) but the largest node "
                            f"type has {max(t.worker_slots for t in setup.node_types)}")
        elif capacity < needed:
            problems.append(f"job {job.job_id!r}: needs {needed} worker(s) of {job.worker_slots} slot(s) but the "
                            f"node types hold at most {capacity}")
    if problems:
        raise ResourceError("; ".join(problems) + " (add a larger node type or raise max_nodes)")


def simulate(jobs: Sequence[Job], setup: ClusterSetup, *, node_losses: Sequence[float] = ()) -> FleetResult:
    """Replay ``jobs`` through ``setup``; ``node_losses`` are times at which the busiest up node is lost.

    Runs until every job has finished and the horizon has passed (then until the autoscaler has removed
    the idle nodes, so no setup is charged for a different tail).

    Raises:
        ResourceError: a job that can never fit (see :func:`check_fits`).
    """
    check_fits(jobs, setup)
    return _Simulation(sorted(jobs, key=lambda job: job.arrival_s), setup, sorted(node_losses)).run()


class _Simulation:
    def __init__(self, jobs: list[Job], setup: ClusterSetup, node_losses: list[float]) -> None:
        self.setup = setup
        self.pending_arrivals = list(jobs)
        self.outcomes = [JobOutcome(job.job_id, job.arrival_s) for job in jobs]
        self.outcome_of = {job.job_id: outcome for job, outcome in zip(jobs, self.outcomes)}
        self.node_losses = node_losses
        self.nodes: dict[int, _Node] = {}
        self.next_node_id = 0
        self.queue: list[_RunningJob] = []
        self.running: list[_RunningJob] = []
        self.unfinished = len(jobs)
        self.node_s = self.idle_node_s = self.provisioned_slot_s = 0.0
        self.busy_worker_s = self.busy_slot_s = 0.0
        self.booting_node_s = self.restarting_slot_s = 0.0
        self.accounted_until_s = 0.0
        self.series: dict[str, list[float]] = {key: [] for key in
                                               ("t_s", "nodes", "ready_nodes", "busy_workers", "queued_jobs",
                                                "running_jobs")}
        if not setup.autoscaling:
            for node_type in setup.node_types:
                for _ in range(node_type.max_nodes):
                    self._launch(node_type, now=0.0, ready_s=0.0)
        else:
            for node_type in setup.node_types:
                for _ in range(node_type.min_nodes):
                    self._launch(node_type, now=0.0, ready_s=0.0)

    # -- the clock ---------------------------------------------------------------------------------

    def run(self) -> FleetResult:
        setup = self.setup
        tick = 0
        autoscale_every = max(1, round(setup.autoscaler_interval_s / setup.tick_s))
        sample_every = max(1, round(setup.sample_s / setup.tick_s))
        while True:
            now = tick * setup.tick_s
            if self.unfinished == 0 and now >= setup.horizon_s and self._settled():
                break
            if now > setup.horizon_s + _GIVE_UP_AFTER_S:
                raise RuntimeError(f"{setup.name}: {self.unfinished} job(s) still unfinished after "
                                   f"{now:.0f} s of simulated time; the setup cannot run them")
            self._lose_nodes(now)
            while self.pending_arrivals and self.pending_arrivals[0].arrival_s <= now + _EPSILON:
                job = self.pending_arrivals.pop(0)
                self.queue.append(_RunningJob(job, self.outcome_of[job.job_id]))
            self._start_queued(now)
            if setup.elastic:
                self._grow(now)
            if setup.autoscaling and tick % autoscale_every == 0:
                self._autoscale(now)
            if tick % sample_every == 0:
                self._sample(now)
            self._account(now, setup.tick_s)  # the nodes as they stand through [now, now + tick)
            self._step(now, setup.tick_s)
            tick += 1
        end_s = max(self.accounted_until_s, setup.horizon_s,
                    *(outcome.finish_s or 0.0 for outcome in self.outcomes))
        return FleetResult(setup.name, end_s, self.node_s, self.idle_node_s, self.provisioned_slot_s,
                           self.busy_worker_s, self.busy_slot_s, self.outcomes, self.series,
                           booting_node_s=self.booting_node_s, restarting_slot_s=self.restarting_slot_s)

    def _settled(self) -> bool:
        if not self.setup.autoscaling:
            return True
        floor = sum(node_type.min_nodes for node_type in self.setup.node_types)
        return len(self.nodes) <= floor

    def _ready_nodes(self, now: float) -> list[_Node]:
        return [node for node in self.nodes.values() if node.ready_s <= now + _EPSILON]

    # -- placement ---------------------------------------------------------------------------------

    def _placeable(self, job: Job, now: float) -> int:
        return sum(node.free_slots // job.worker_slots for node in self._ready_nodes(now))

    def _place(self, state: _RunningJob, count: int, now: float, *, avoid: Sequence[int] = ()) -> None:
        """Put ``count`` workers on up nodes (not those in ``avoid``), fullest first (Ray's PACK strategy)."""
        slots = state.job.worker_slots
        for node in sorted(self._ready_nodes(now), key=lambda n: (n.free_slots, n.node_id)):
            if node.node_id in avoid:
                continue
            while count and node.free_slots >= slots:
                node.used_slots += slots
                state.workers.append(node.node_id)
                count -= 1
        assert count == 0, "placement was checked first"

    def _release(self, state: _RunningJob, now: float, *, node_ids: Sequence[int] | None = None) -> None:
        keep = []
        for node_id in state.workers:
            if node_ids is not None and node_id not in node_ids:
                keep.append(node_id)
                continue
            node = self.nodes.get(node_id)
            if node is not None:
                node.used_slots -= state.job.worker_slots
                if node.used_slots == 0:
                    node.idle_since_s = now
        state.workers = keep

    def _start_queued(self, now: float) -> None:
        for state in list(self.queue):
            job = state.job
            free = self._placeable(job, now)
            if self.setup.elastic:
                if free < job.min_workers:
                    continue
                count = min(free, job.max_workers)
            else:
                if free < job.max_workers:
                    continue
                count = job.max_workers
            self.queue.remove(state)
            self._place(state, count, now)
            self._begin_stepping(state, now)
            if state.outcome.first_start_s is None:
                state.outcome.first_start_s = now
            self.running.append(state)

    def _begin_stepping(self, state: _RunningJob, now: float) -> None:
        state.stepping_from_s = now + self.setup.restart_s
        state.at_boundary = False
        state.outcome.workers_seen.append(len(state.workers))

    def _grow(self, now: float) -> None:
        for state in self.running:
            job = state.job
            at_checkpoint = state.at_boundary or abs(state.steps_done - state.checkpoint_step) < _EPSILON
            if not at_checkpoint:
                continue
            extra = min(self._placeable(job, now), job.max_workers - len(state.workers))
            if extra > 0:
                self._place(state, extra, now)
                state.outcome.resizes += 1
                self._begin_stepping(state, now)
            elif not (state.at_boundary and self._move_off_drained_node(state, now)):
                state.at_boundary = False  # the slots went elsewhere: carry on stepping

    def _drain_target(self, now: float) -> _Node | None:
        """The node to empty (consolidation): the up node with the fewest busy slots, when other jobs' nodes
        have room for all its workers; None when no node can be emptied that way."""
        occupied = [node for node in self._ready_nodes(now) if node.used_slots]
        if len(occupied) < 2:
            return None
        target = min(occupied, key=lambda node: (node.used_slots, -node.node_id))
        room = sum(node.free_slots for node in occupied if node is not target)
        return target if target.used_slots <= room else None

    def _nodes_to_leave(self, state: _RunningJob, now: float) -> list[int]:
        """The drain target's id when ``state`` has workers there and they fit beside other jobs, else []."""
        if not self.setup.consolidate:
            return []
        target = self._drain_target(now)
        if target is None or target.node_id not in state.workers:
            return []
        slots = state.job.worker_slots
        mine = state.workers.count(target.node_id)
        room = sum(node.free_slots // slots for node in self._ready_nodes(now)
                   if node.used_slots and node is not target)
        return [target.node_id] if mine <= room else []

    def _move_off_drained_node(self, state: _RunningJob, now: float) -> bool:
        """At a checkpoint, restart the workers ``state`` has on the drain target on free slots beside other jobs."""
        leave = self._nodes_to_leave(state, now)
        if not leave:
            return False
        moved = sum(1 for node_id in state.workers if node_id in leave)
        self._release(state, now, node_ids=leave)
        self._place(state, moved, now, avoid=leave)
        state.outcome.moves += 1
        self._begin_stepping(state, now)
        return True

    # -- stepping ----------------------------------------------------------------------------------

    def _step(self, now: float, dt: float) -> None:
        for state in list(self.running):
            start = max(now, state.stepping_from_s)
            if start >= now + dt - _EPSILON or state.at_boundary:
                continue
            job = state.job
            workers = len(state.workers)
            rate = speedup(workers, self.setup.scaling_efficiency) / job.step_s  # steps per second
            available = now + dt - start
            target = min(job.steps, state.steps_done + rate * available)
            next_checkpoint = (math.floor(state.steps_done / job.checkpoint_steps + _EPSILON) + 1) * job.checkpoint_steps
            crosses = target >= next_checkpoint - _EPSILON and next_checkpoint < job.steps
            could_grow = crosses and self.setup.elastic and (
                (workers < job.max_workers and self._placeable(job, now) > 0)
                or bool(self._nodes_to_leave(state, now)))
            if could_grow:
                target = next_checkpoint
                state.at_boundary = True
            elapsed = (target - state.steps_done) / rate
            self.busy_worker_s += workers * elapsed
            self.busy_slot_s += workers * job.worker_slots * elapsed
            state.steps_done = target
            state.checkpoint_step = max(state.checkpoint_step,
                                        math.floor(target / job.checkpoint_steps + _EPSILON) * job.checkpoint_steps)
            if target >= job.steps - _EPSILON:
                state.outcome.finish_s = start + elapsed
                self._release(state, state.outcome.finish_s)
                self.running.remove(state)
                self.unfinished -= 1

    def _lose_nodes(self, now: float) -> None:
        while self.node_losses and self.node_losses[0] <= now + _EPSILON:
            self.node_losses.pop(0)
            ready = self._ready_nodes(now)
            if not ready:
                continue
            victim = max(ready, key=lambda node: (node.used_slots, node.node_id))
            for state in [s for s in self.running if victim.node_id in s.workers]:
                job = state.job
                state.outcome.lost_steps += state.steps_done - state.checkpoint_step
                state.steps_done = state.checkpoint_step
                self._release(state, now, node_ids=[victim.node_id])
                state.outcome.resizes += 1
                if self.setup.elastic and len(state.workers) >= job.min_workers:
                    self._begin_stepping(state, now)
                else:
                    self._release(state, now)
                    self.running.remove(state)
                    self.queue.append(state)
                    self.queue.sort(key=lambda s: s.job.arrival_s)
            del self.nodes[victim.node_id]

    # -- the autoscaler ----------------------------------------------------------------------------

    def _launch(self, node_type: NodeType, *, now: float, ready_s: float) -> _Node:
        node = _Node(self.next_node_id, node_type, launched_s=now, ready_s=ready_s, idle_since_s=ready_s)
        self.nodes[node.node_id] = node
        self.next_node_id += 1
        return node

    def _autoscale(self, now: float) -> None:
        setup = self.setup
        demand: list[int] = []  # one entry per pending worker bundle: its slots
        for state in self.queue:
            demand += [state.job.worker_slots] * state.job.max_workers
        if setup.elastic:
            for state in self.running:
                demand += [state.job.worker_slots] * (state.job.max_workers - len(state.workers))
        demand.sort(reverse=True)
        # Free capacity of up and starting nodes first (first fit, fullest node first).
        capacity = {node.node_id: node.free_slots for node in
                    sorted(self.nodes.values(), key=lambda n: (n.free_slots, n.node_id))}
        counted: set[int] = set()
        unmet = []
        for slots in demand:
            home = next((node_id for node_id, free in capacity.items() if free >= slots), None)
            if home is None:
                unmet.append(slots)
            else:
                capacity[home] -= slots
                counted.add(home)
        # New nodes: the type that fits the most of what is left, while under its max.
        while unmet:
            count_of = {t.name: sum(1 for n in self.nodes.values() if n.node_type.name == t.name)
                        for t in setup.node_types}
            best: tuple[int, NodeType, list[int]] | None = None
            for node_type in setup.node_types:
                if count_of[node_type.name] >= node_type.max_nodes:
                    continue
                packed, free = [], node_type.worker_slots
                for slots in unmet:
                    if slots <= free:
                        packed.append(slots)
                        free -= slots
                if packed and (best is None or sum(packed) > best[0]):
                    best = (sum(packed), node_type, packed)
            if best is None:
                break
            _, node_type, packed = best
            self._launch(node_type, now=now, ready_s=now + setup.startup_s)
            for slots in packed:
                unmet.remove(slots)
        # Idle nodes past the timeout go, down to each type's minimum.
        for node in sorted(self.nodes.values(), key=lambda n: -n.node_id):
            if node.used_slots or node.ready_s > now + _EPSILON or node.node_id in counted:
                continue
            if now - node.idle_since_s < setup.idle_timeout_s - _EPSILON:
                continue
            same_type = sum(1 for n in self.nodes.values() if n.node_type.name == node.node_type.name)
            if same_type > node.node_type.min_nodes:
                del self.nodes[node.node_id]

    # -- accounting --------------------------------------------------------------------------------

    def _account(self, now: float, dt: float) -> None:
        if self.nodes:
            self.accounted_until_s = now + dt
        for node in self.nodes.values():
            self.node_s += dt
            self.provisioned_slot_s += node.node_type.worker_slots * dt
            if node.used_slots == 0:
                self.idle_node_s += dt
            booting = min(dt, node.ready_s - now)
            if booting > 0:
                self.booting_node_s += booting
        for state in self.running:
            restarting = min(dt, state.stepping_from_s - now)
            if restarting > 0:
                self.restarting_slot_s += restarting * len(state.workers) * state.job.worker_slots

    def _sample(self, now: float) -> None:
        stepping = sum(len(s.workers) for s in self.running if s.stepping_from_s <= now + _EPSILON)
        values = (now, len(self.nodes), len(self._ready_nodes(now)), stepping, len(self.queue), len(self.running))
        for key, value in zip(self.series, values):
            self.series[key].append(float(value))
