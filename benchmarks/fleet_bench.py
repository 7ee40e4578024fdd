"""Fleet benchmark: a day of training and fine-tuning jobs on one cluster, four provisioning setups.

``--part sim`` generates a day of job arrivals (llmstack.fleet.generate_day: diurnal
submissions, heavy-tailed run times, mostly small jobs, after Jeon et al. ATC'19, Weng et al. NSDI'22 and
Hu et al. SC'21) and replays it through llmstack.fleet.simulate in four setups:

1. static: a cluster sized for the trace's peak demand (every job at its max workers from its arrival), always on;
2. autoscaling + fixed-size jobs: Ray's autoscaler rules (bin-packing pending worker bundles onto nodes,
   node start-up delay, idle timeout), each job gang-starts on its ``max_workers``;
3. autoscaling + elastic jobs: the same autoscaler, jobs start on ``>= min_workers`` and grow at checkpoints;
4. the same with consolidation: at their checkpoints elastic jobs leave the emptiest busy node for free slots
   beside other jobs, so the idle timeout can take it (a node drain; not in llmstack's live path yet).

The headline day is seed 0; seeds 0-4 give the spread, and a small sweep (node size, idle timeout,
worker restart cost) shows what the figures depend on. The simulator runs each day in about a second.

Writes benchmarks/results/fleet.json, fleet_trace.csv (the seed-0 day), fleet_sim.png (nodes and busy
workers over the day) and the ``## fleet (simulated)`` section of benchmarks/RESULTS.md.

``--part live`` runs the first three setups on a short slice of the seed-0 day (4 jobs from 09:00, shrunk to
8-16 s of stepping and at most 2 workers, each micro-batch with 0.4 s of emulated accelerator time) on a local
autoscaling Ray cluster (llmstack.fleet.local_cluster: 1-3 one-CPU worker nodes); each setup waits for all its jobs
(bounded). Its ``kill`` part runs one elastic job and SIGKILLs the raylet of a node holding one of its workers
mid-run: the steps the restart lost against the checkpoint interval. Writes fleet_live.json and the
``## fleet (live)`` section; ``--quick`` (the elastic setup on 2 jobs and the kill) is a smoke run that writes
fleet_live_quick.json only.

Reproduce: PYTHONPATH=src python benchmarks/fleet_bench.py --part sim     (about 2 minutes on 2 busy CPU cores)
           flock /tmp/llmstack-ray.lock timeout 1200 env PYTHONPATH=src python benchmarks/fleet_bench.py --part live
           (about 12 minutes here, at most about 18; ``--live-parts static,fixed`` runs some parts)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from harness import RESULTS_DIR, logger, write_section
from harness.plots import pyplot

from llmstack.fleet import ClusterSetup, FleetResult, Job, NodeType, generate_day, peak_demand_slots, simulate
from llmstack.fleet import write_jobs

RESULTS = RESULTS_DIR
SEEDS = (0, 1, 2, 3, 4)
JOBS_PER_DAY = 400.0
NODE_SLOTS = 8  # accelerators per node (an 8-GPU machine)
STARTUP_S = 180.0  # a cloud GPU node from launch to joining Ray (assumed: image pull and driver start included)
IDLE_TIMEOUT_S = 300.0  # Ray's autoscaler default (idle_timeout_minutes: 5)
AUTOSCALER_INTERVAL_S = 5.0  # Ray's autoscaler update interval
RESTART_S = 30.0  # a worker group's (re)start before its first step (at start, grow and shrink)
SCALING_EFFICIENCY = 0.9  # each added data-parallel worker adds 90% of one worker's throughput
TARGETS = {"utilisation_elastic": 0.75, "idle_reduction_vs_static": 0.60, "median_completion_ratio": 1.2}
SETUP_NAMES = ("static", "autoscaling + fixed", "autoscaling + elastic", "autoscaling + elastic + consolidation")


log = logger("fleet-bench")


def setups(max_nodes: int, *, node_slots: int = NODE_SLOTS, idle_timeout_s: float = IDLE_TIMEOUT_S,
           restart_s: float = RESTART_S) -> list[ClusterSetup]:
    node_type = NodeType(f"node{node_slots}", worker_slots=node_slots, max_nodes=max_nodes)
    common = {"startup_s": STARTUP_S, "idle_timeout_s": idle_timeout_s, "autoscaler_interval_s": AUTOSCALER_INTERVAL_S,
              "restart_s": restart_s, "scaling_efficiency": SCALING_EFFICIENCY, "horizon_s": 86_400.0}
    return [ClusterSetup(SETUP_NAMES[0], (node_type,), autoscaling=False, **common),
            ClusterSetup(SETUP_NAMES[1], (node_type,), autoscaling=True, elastic=False, **common),
            ClusterSetup(SETUP_NAMES[2], (node_type,), autoscaling=True, elastic=True, **common),
            ClusterSetup(SETUP_NAMES[3], (node_type,), autoscaling=True, elastic=True, consolidate=True, **common)]


def run_day(jobs: list[Job], *, node_slots: int = NODE_SLOTS, **options: Any) -> dict[str, Any]:
    """The four setups on one day; static is sized for the peak and is every setup's node cap."""
    max_nodes = math.ceil(peak_demand_slots(jobs, scaling_efficiency=SCALING_EFFICIENCY) / node_slots)
    results = [simulate(jobs, setup) for setup in setups(max_nodes, node_slots=node_slots, **options)]
    return {"max_nodes": max_nodes, "results": results, "figures": figures(results, node_slots=node_slots)}


def figures(results: list[FleetResult], *, node_slots: int) -> dict[str, Any]:
    summaries = {result.setup: result.summary() for result in results}
    static = summaries[SETUP_NAMES[0]]
    for summary in summaries.values():
        summary["idle_reduction_vs_static"] = 1 - summary["idle_node_s"] / static["idle_node_s"]
        summary["node_s_vs_static"] = summary["node_s"] / static["node_s"]
        summary["median_completion_ratio"] = summary["completion_median_s"] / static["completion_median_s"]
        summary["p95_completion_ratio"] = summary["completion_p95_s"] / static["completion_p95_s"]
        # Where provisioned slots went unused: whole idle nodes (booting included), the rest on used nodes
        # (free slots beside a running job, and worker groups (re)starting).
        summary["idle_node_slot_s"] = summary["idle_node_s"] * node_slots
        summary["unused_slot_s_on_used_nodes"] = (summary["provisioned_slot_s"] - summary["busy_slot_s"]
                                                  - summary["idle_node_slot_s"])
        # The unused slot-time split four ways: nodes booting, up but idle (waiting out the idle timeout),
        # worker groups (re)starting, and free slots beside running jobs with nothing pending to use them.
        summary["booting_slot_s"] = summary["booting_node_s"] * node_slots
        summary["idle_up_slot_s"] = summary["idle_node_slot_s"] - summary["booting_slot_s"]
        summary["free_beside_jobs_slot_s"] = summary["unused_slot_s_on_used_nodes"] - summary["restarting_slot_s"]
    return summaries


def check_targets(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The issue's three targets for one setup: value, target, met."""
    return {
        "utilisation >= 75%": {"value": summary["utilisation"], "target": TARGETS["utilisation_elastic"],
                               "met": summary["utilisation"] >= TARGETS["utilisation_elastic"]},
        ">= 60% fewer idle node-seconds than static": {
            "value": summary["idle_reduction_vs_static"], "target": TARGETS["idle_reduction_vs_static"],
            "met": summary["idle_reduction_vs_static"] >= TARGETS["idle_reduction_vs_static"]},
        "median completion <= 1.2x static": {
            "value": summary["median_completion_ratio"], "target": TARGETS["median_completion_ratio"],
            "met": summary["median_completion_ratio"] <= TARGETS["median_completion_ratio"]},
    }


def plot(results: list[FleetResult], path: Path) -> None:
    plt = pyplot()
    fig, (nodes_ax, busy_ax) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True)
    for result, colour in zip(results, ("tab:grey", "tab:blue", "tab:green", "tab:purple")):
        hours = [t / 3600 for t in result.series["t_s"]]
        nodes_ax.step(hours, result.series["nodes"], where="post", color=colour, label=result.setup)
        busy_ax.step(hours, result.series["busy_workers"], where="post", color=colour, label=result.setup,
                     alpha=0.85)
    nodes_ax.set_ylabel("nodes provisioned")
    busy_ax.set_ylabel("busy workers (stepping)")
    busy_ax.set_xlabel("hour of the simulated day")
    nodes_ax.set_title(f"fleet simulator, seed-0 day ({len(results[0].jobs)} jobs, {NODE_SLOTS}-slot nodes)")
    nodes_ax.legend(loc="upper left", fontsize=8)
    for ax in (nodes_ax, busy_ax):
        ax.grid(alpha=0.3)
    busy_ax.set_xlim(0, 24)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_sim() -> dict[str, Any]:
    started = time.perf_counter()
    days: dict[int, dict[str, Any]] = {}
    headline: dict[str, Any] = {}
    for seed in SEEDS:
        jobs = generate_day(seed=seed, jobs_per_day=JOBS_PER_DAY, scaling_efficiency=SCALING_EFFICIENCY)
        day = run_day(jobs)
        days[seed] = {"jobs": len(jobs), "max_nodes": day["max_nodes"], "figures": day["figures"]}
        log(f"seed {seed}: {len(jobs)} jobs, {day['max_nodes']} nodes at peak; " + ", ".join(
            f"{name}: util {s['utilisation']:.0%} idle {s['idle_node_s'] / 3600:.0f} node-h"
            for name, s in day["figures"].items()))
        if seed == SEEDS[0]:
            headline = day
            write_jobs(RESULTS / "fleet_trace.csv", jobs)
            plot(day["results"], RESULTS / "fleet_sim.png")
    seed0_jobs = generate_day(seed=SEEDS[0], jobs_per_day=JOBS_PER_DAY, scaling_efficiency=SCALING_EFFICIENCY)
    sweep = []
    for label, options in (("4-slot nodes", {"node_slots": 4}), ("2-slot nodes", {"node_slots": 2}),
                           ("idle timeout 60 s (KubeRay default)", {"idle_timeout_s": 60.0}),
                           ("worker restart 0 s", {"restart_s": 0.0}), ("worker restart 120 s", {"restart_s": 120.0})):
        day = run_day(seed0_jobs, **options)
        sweep.append({"variant": label, "options": options, "max_nodes": day["max_nodes"], "figures": day["figures"]})
        log(f"sweep {label}: " + ", ".join(f"{name}: util {s['utilisation']:.0%}"
                                          for name, s in day["figures"].items()))
    spread = {}
    for name in SETUP_NAMES:
        spread[name] = {key: {"mean": statistics.mean(days[s]["figures"][name][key] for s in SEEDS),
                              "min": min(days[s]["figures"][name][key] for s in SEEDS),
                              "max": max(days[s]["figures"][name][key] for s in SEEDS)}
                        for key in ("utilisation", "idle_reduction_vs_static", "median_completion_ratio",
                                    "node_s_vs_static")}
    headline_series = {result.setup: {key: values[::5] for key, values in result.series.items()}  # 5-minute points
                       for result in headline["results"]}
    return {
        "part": "sim",
        "parameters": {"jobs_per_day": JOBS_PER_DAY, "node_slots": NODE_SLOTS, "startup_s": STARTUP_S,
                       "idle_timeout_s": IDLE_TIMEOUT_S, "autoscaler_interval_s": AUTOSCALER_INTERVAL_S,
                       "restart_s": RESTART_S, "scaling_efficiency": SCALING_EFFICIENCY, "seeds": list(SEEDS),
                       "tick_s": 1.0},
        "headline": {"seed": SEEDS[0], "jobs": len(headline["results"][0].jobs), "max_nodes": headline["max_nodes"],
                     "figures": headline["figures"],
                     "targets": {name: check_targets(headline["figures"][name]) for name in SETUP_NAMES[1:]}},
        "seeds": {str(seed): day for seed, day in days.items()},
        "spread": spread,
        "sweep": sweep,
        "series_seed0_5min": headline_series,
        "wall_s": time.perf_counter() - started,
    }


def markdown(results: dict[str, Any]) -> str:
    p = results["parameters"]
    head = results["headline"]
    names = list(head["figures"])
    lines = [
        "## fleet (simulated)",
        "",
        "A generated day of training and fine-tuning jobs (`llmstack.fleet.generate_day`, seed "
        f"{head['seed']}: {head['jobs']} jobs; submissions peak in working hours, log-normal run times with a "
        "20-minute median and a long tail, half the jobs on one worker — shapes from Jeon et al., ATC'19 "
        "(Microsoft Philly), Weng et al., NSDI'22 (Alibaba PAI) and Hu et al., SC'21 (SenseTime Helios); the "
        "parameters are ours, not fitted to those traces) replayed by `llmstack.fleet.simulate` through "
        f"{len(names)} setups. {p['node_slots']}-slot nodes; static = {head['max_nodes']} nodes, the trace's peak "
        "demand (every job at its max workers from arrival), which is also the autoscalers' node cap. Autoscaler: "
        f"Ray's rules (pending worker bundles bin-packed onto nodes, every {p['autoscaler_interval_s']:.0f} s; "
        f"node start-up {p['startup_s']:.0f} s; idle timeout {p['idle_timeout_s']:.0f} s). Each worker-group "
        f"(re)start costs {p['restart_s']:.0f} s; throughput = 1 + {p['scaling_efficiency']} x (workers - 1). "
        "Elastic jobs grow onto free slots at their next checkpoint. Consolidation (the fourth setup, a policy "
        "of the simulator, not yet in llmstack's live path): an elastic job at a checkpoint that has workers on "
        "the emptiest busy node restarts them on free slots beside other jobs when those hold all of that node's "
        "workers, so the node empties and the idle timeout takes it (live, this would be a node drain: Ray "
        "Train 2.60's preemption notice, a checkpoint, the worker group restarted elsewhere). These are "
        "simulated figures from assumed costs, not measurements of a cluster.",
        "",
        "| setup | node-h | idle node-h | busy worker-h | utilisation | idle vs static "
        "| completion median / p95 (min) | queue wait median / p95 (s) | resizes / moves |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in head["figures"].items():
        versus = "—" if name == SETUP_NAMES[0] else f"{-s['idle_reduction_vs_static']:+.0%}"
        lines.append(
            f"| {name} | {s['node_s'] / 3600:.0f} | {s['idle_node_s'] / 3600:.0f} | {s['busy_worker_s'] / 3600:.0f} "
            f"| {s['utilisation']:.1%} | {versus} "
            f"| {s['completion_median_s'] / 60:.1f} / {s['completion_p95_s'] / 60:.1f} "
            f"| {s['queue_wait_median_s']:.0f} / {s['queue_wait_p95_s']:.0f} | {s['resizes']} / {s.get('moves', 0)} |")
    lines += ["", "Where the provisioned slot-time that is not stepping goes (seed 0; slot-hours, share of "
              "provisioned):",
              "", "| setup | nodes booting | nodes up, idle (idle timeout) | worker groups (re)starting "
              "| free slots beside running jobs |", "|---|---|---|---|---|"]
    for name, s in head["figures"].items():
        parts = [s["booting_slot_s"], s["idle_up_slot_s"], s["restarting_slot_s"], s["free_beside_jobs_slot_s"]]
        lines.append(f"| {name} | " + " | ".join(f"{v / 3600:.0f} ({v / s['provisioned_slot_s']:.1%})" for v in parts)
                     + " |")
    lines += ["", "Targets of issue #27 (seed 0):", "",
              "| setup | target | value | met |", "|---|---|---|---|"]
    for name, targets in head["targets"].items():
        for target, row in targets.items():
            value = f"{row['value']:.2f}x" if "completion" in target else f"{row['value']:.1%}"
            lines.append(f"| {name} | {target} | {value} | {'yes' if row['met'] else '**no**'} |")
    elastic, packed = head["figures"][SETUP_NAMES[2]], head["figures"][SETUP_NAMES[3]]
    free_share = elastic["free_beside_jobs_slot_s"] / (elastic["provisioned_slot_s"] - elastic["busy_slot_s"])
    smaller = {row["variant"]: row["figures"][SETUP_NAMES[2]]["utilisation"] for row in results["sweep"]}
    spread = results["spread"]
    lines += ["", f"Reading: the autoscalers remove nearly all idle nodes. What keeps plain elastic jobs at "
              f"{elastic['utilisation']:.0%} is not scale-down lag (nodes up and idle: "
              f"{elastic['idle_up_slot_s'] / elastic['provisioned_slot_s']:.1%} of provisioned slot-time), start-up "
              f"({elastic['booting_slot_s'] / elastic['provisioned_slot_s']:.1%} booting, "
              f"{elastic['restarting_slot_s'] / elastic['provisioned_slot_s']:.1%} worker groups restarting) or "
              f"jobs waiting for slots (median queue wait {elastic['queue_wait_median_s']:.0f} s), but "
              f"fragmentation: {free_share:.0%} of its unused slot-time is free slots beside running jobs when "
              "no job asks for them (every running job already at its max, nothing queued). A node stays up while "
              "any worker runs on it, and the gaps its finished neighbours leave are never filled, so growing at "
              "checkpoints (which the simulator already does) cannot help. Consolidation empties those nodes: "
              f"{packed['utilisation']:.1%} on this day ({spread[SETUP_NAMES[3]]['utilisation']['mean']:.1%} over "
              f"the seeds), {packed['node_s'] / elastic['node_s'] - 1:+.0%} node-hours against plain elastic, for "
              f"{packed.get('moves', 0)} restarts of {p['restart_s']:.0f} s and a median completion of "
              f"{packed['median_completion_ratio']:.2f}x static. Smaller nodes fragment less: plain elastic reaches "
              + ", ".join(f"{v:.0%} ({k})" for k, v in smaller.items() if "slot" in k)
              + ". Static is sized for the unqueued peak, so its utilisation is lower than the 45-55% the issue "
              "quotes for static provisioning."]
    lines += ["", f"Spread over seeds {', '.join(map(str, p['seeds']))} (mean, min-max):", "",
              "| setup | utilisation | idle node-s vs static | median completion vs static | node-s vs static |",
              "|---|---|---|---|---|"]
    for name, row in spread.items():
        u, i, c, n = (row[k] for k in ("utilisation", "idle_reduction_vs_static", "median_completion_ratio",
                                       "node_s_vs_static"))
        lines.append(f"| {name} | {u['mean']:.1%} ({u['min']:.1%}-{u['max']:.1%}) "
                     f"| {-i['mean']:+.0%} ({-i['max']:+.0%} to {-i['min']:+.0%}) "
                     f"| {c['mean']:.2f}x ({c['min']:.2f}-{c['max']:.2f}) | {n['mean']:.2f}x ({n['min']:.2f}-{n['max']:.2f}) |")
    lines += ["", "What the figures depend on (seed 0; utilisation " + " / ".join(names) + "):", "",
              "| variant | nodes at peak | utilisation | consolidation: idle vs static, median completion vs static |",
              "|---|---|---|---|"]
    for row in results["sweep"]:
        f = row["figures"]
        last = f[SETUP_NAMES[3]]
        lines.append(f"| {row['variant']} | {row['max_nodes']} | "
                     + " / ".join(f"{f[name]['utilisation']:.1%}" for name in SETUP_NAMES)
                     + f" | {-last['idle_reduction_vs_static']:+.0%}, {last['median_completion_ratio']:.2f}x |")
    lines += ["", "![nodes and busy workers over the day](results/fleet_sim.png)", "",
              "Reproduce: `PYTHONPATH=src python benchmarks/fleet_bench.py --part sim` "
              f"(the whole part ran in {results['wall_s']:.0f} s here). JSON: `benchmarks/results/fleet.json`; the "
              "seed-0 trace: `benchmarks/results/fleet_trace.csv` (`llmstack.fleet.read_jobs` reads it)."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- --part live

LIVE_NODES = (1, 3)  # one-CPU worker nodes of the autoscaling setups (min, max); static: 3 up throughout
LIVE_JOBS = 4
LIVE_TIME_SCALE = 60.0  # a minute of the trace is a second live
LIVE_RUNTIME_S = (8.0, 16.0)  # a live job's stepping time on its max workers (scaled from the trace, clipped)
LIVE_MAX_WORKERS = 2
LIVE_DEVICE_S = 0.4  # emulated accelerator seconds per micro-batch (LLMSTACK_EMULATED_DEVICE_S), inside the step
LIVE_STEP_S = 0.5  # a step on max workers: the emulated 0.4 s plus the tiny model's CPU work (sizes step counts)
LIVE_CHECKPOINT_EVERY = 8
LIVE_IDLE_TIMEOUT_S = 10.0
LIVE_SETUP_BOUND_S = 240.0  # a setup waits for all its jobs, at most this long after the first submission
LIVE_KILL_STEPS = 48  # the node-kill part's one elastic job
LIVE_KILL_BOUND_S = 240.0  # its restart waits out Ray Train's wait for the lost node's replacement
LIVE_DATA = {"max_documents": 200, "vocab_size": 512, "block_size": 64}
LIVE_PARTS = ("static", "fixed", "elastic", "kill")  # --live-parts names: SETUP_NAMES[:3], then the node kill


def live_rows(count: int = LIVE_JOBS) -> list[Any]:
    from llmstack.fleet.live import live_slice

    jobs = generate_day(seed=SEEDS[0], jobs_per_day=JOBS_PER_DAY, scaling_efficiency=SCALING_EFFICIENCY)
    return live_slice(jobs, count=count, from_s=9 * 3600.0, time_scale=LIVE_TIME_SCALE, runtime_s=LIVE_RUNTIME_S,
                      max_workers=LIVE_MAX_WORKERS, step_s=LIVE_STEP_S, scaling_efficiency=SCALING_EFFICIENCY)


def live_config(row: Any, *, elastic: bool, registry: Path, runs: Path) -> dict[str, Any]:
    """A tiny-preset run of ``row.steps`` steps; its global batch is ``2 x max_workers`` blocks at every size."""
    workers: Any = [1, row.max_workers] if elastic and row.max_workers > 1 else row.max_workers
    return {"name": row.name, "registry": str(registry), "storage_path": str(runs), "data": dict(LIVE_DATA),
            "training": {"max_steps": row.steps, "micro_batch_size": 2, "grad_accum_steps": 1, "warmup_steps": 1,
                         "eval_every": row.steps, "eval_batches": 1, "checkpoint_every": LIVE_CHECKPOINT_EVERY},
            "scaling": {"num_workers": workers, "max_failures": 3, "elastic_resize_interval_s": 3}}


def live_env() -> dict[str, str]:
    from llmstack.fleet.local_cluster import driver_env

    return driver_env(OMP_NUM_THREADS="1", LLMSTACK_EMULATED_DEVICE_S=str(LIVE_DEVICE_S),
                      PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))


class LiveRuns:
    """The training runs of one live part: ``python -m llmstack train`` drivers started with ``RAY_ADDRESS``
    (the entrypoint a Ray Job runs), each with its log, submission and end times.

    Not through the job API: on the fake multi-node cluster every fake node's runtime-env agent shares the
    head's session directory, and one of them deleted a job's unpacked working directory under its driver.
    """

    def __init__(self, workdir: Path, env: dict[str, str], gcs_address: str, *, elastic: bool) -> None:
        self.workdir, self.env, self.gcs_address, self.elastic = workdir, env, gcs_address, elastic
        self.registry, self.runs = workdir / "registry", workdir / "runs"
        self.drivers: dict[str, Any] = {}  # name -> Popen
        self.submitted: dict[str, float] = {}
        self.ended: dict[str, float] = {}

    def start(self, row: Any) -> None:
        import subprocess

        import yaml

        from llmstack.train.driver import SUBMITTED_AT_ENV

        config = self.workdir / f"{row.name}.yaml"
        config.write_text(yaml.safe_dump(live_config(row, elastic=self.elastic, registry=self.registry,
                                                     runs=self.runs)))
        submitted = time.time()
        with open(self.workdir / f"{row.name}.log", "w") as output:
            self.drivers[row.name] = subprocess.Popen(
                [sys.executable, "-m", "llmstack", "train", "--config", str(config)],
                env={**self.env, "RAY_ADDRESS": self.gcs_address, SUBMITTED_AT_ENV: f"{submitted:.3f}"},
                stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
        self.submitted[row.name] = submitted

    def poll(self) -> list[str]:
        """Names of the runs that ended since the last poll."""
        ended = [name for name, process in self.drivers.items()
                 if name not in self.ended and process.poll() is not None]
        for name in ended:
            self.ended[name] = time.time()
        return ended

    def running(self) -> int:
        return len(self.drivers) - len(self.ended)

    def stop_all(self) -> None:
        for name, process in self.drivers.items():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    def history(self, name: str) -> list[dict[str, Any]]:
        """The run's ``metrics.jsonl`` as its driver last wrote it (every 10 s while it runs)."""
        records = []
        with contextlib.suppress(OSError):
            for line in (self.runs / name / "metrics.jsonl").read_text().splitlines():
                with contextlib.suppress(ValueError):
                    records.append(json.loads(line))
        return records

    def outcome(self, row: Any) -> dict[str, Any]:
        """Status, usage (from the registry manifest; from ``metrics.jsonl`` for a stopped run) and timings."""
        from llmstack.fleet.live import busy_worker_seconds
        from llmstack.registry import Registry

        entry: dict[str, Any] = {**dataclasses.asdict(row), "status": "NOT STARTED"}
        process = self.drivers.get(row.name)
        if process is None:
            return entry
        log_text = (self.workdir / f"{row.name}.log").read_text(errors="replace")
        if process.returncode == 0 and row.name in self.ended:
            manifest = Registry(str(self.registry)).manifest(f"{row.name}@v1")
            entry.update({k: manifest.metrics.get(k) for k in ("worker_seconds", "busy_worker_seconds",
                                                               "queue_wait_s")})
            entry.update(status="SUCCEEDED", completion_s=self.ended[row.name] - self.submitted[row.name],
                         recoveries=manifest.extra.get("recoveries", []))
        else:
            entry.update(status="STOPPED at the bound" if row.name not in self.ended else
                         f"FAILED (rc {process.returncode})", log_tail=log_text[-1500:],
                         busy_worker_seconds=busy_worker_seconds(self.history(row.name)))
        return entry


def run_live_setup(name: str, rows: list[Any], *, workdir: Path) -> dict[str, Any]:
    """Start a local autoscaling cluster for setup ``name``, submit the slice's runs at their offsets, sample
    alive worker nodes and Train workers every second until every run ended (at most ``LIVE_SETUP_BOUND_S``).

    The autoscaling setups keep 1 node up: ``check_cluster`` judges a run on an autoscaling cluster by the node
    types the autoscaler can add (``llmstack.train.capacity``), so a 2-worker fixed run on a 1-node cluster waits
    for its second node instead of failing at start.
    """
    from llmstack.fleet.live import integrate
    from llmstack.fleet.local_cluster import local_autoscaling_cluster, train_workers, worker_nodes

    static, elastic = name == SETUP_NAMES[0], name == SETUP_NAMES[2]
    low, high = LIVE_NODES
    samples: list[tuple[float, int, int]] = []
    env = live_env()
    with local_autoscaling_cluster(min_nodes=high if static else low, max_nodes=high, env=env,
                                   idle_timeout_s=LIVE_IDLE_TIMEOUT_S) as cluster:
        runs = LiveRuns(workdir, env, cluster.gcs_address, elastic=elastic)
        started = time.time()
        pending = sorted(rows, key=lambda row: row.offset_s)
        last_report = -math.inf
        try:
            while time.time() - started < LIVE_SETUP_BOUND_S:
                now = time.time() - started
                while pending and pending[0].offset_s <= now:
                    row = pending.pop(0)
                    runs.start(row)
                    log(f"{name} +{now:4.0f} s: submitted {row.name} ({row.steps} steps, {row.max_workers} workers)")
                for ended in runs.poll():
                    log(f"{name} +{now:4.0f} s: {ended} ended (rc {runs.drivers[ended].returncode})")
                try:
                    nodes, workers = len(worker_nodes(cluster.dashboard)), len(train_workers(cluster.dashboard))
                    samples.append((now, nodes, workers))
                    if now - last_report >= 10.0:
                        last_report = now
                        log(f"{name} +{now:4.0f} s: {nodes} worker node(s), {workers} Train worker(s), "
                            f"{runs.running()} run(s) going, {len(runs.ended)}/{len(rows)} ended")
                except Exception as exc:  # a slow state API answer: skip this sample
                    log(f"{name}: sample skipped ({type(exc).__name__})")
                if not pending and len(runs.ended) == len(rows):
                    break
                time.sleep(1.0)
        finally:
            span = time.time() - started
            runs.stop_all()
    node_s, train_worker_actor_s = integrate(samples, start=0.0, end=span)
    jobs = [runs.outcome(row) for row in rows]
    done = [job for job in jobs if job["status"] == "SUCCEEDED"]
    busy = sum(job.get("busy_worker_seconds") or 0.0 for job in jobs)
    completions = sorted(job["completion_s"] for job in done)
    return {"setup": name, "jobs": jobs, "jobs_done": len(done), "wall_s": span, "node_s": node_s,
            "busy_worker_s": busy, "train_worker_actor_s": train_worker_actor_s,
            "utilisation": busy / node_s if node_s else 0.0,
            "idle_node_s": node_s - train_worker_actor_s,  # one-CPU nodes: a node without a Train worker is idle
            "completion_median_s": statistics.median(completions) if completions else math.nan,
            "completion_max_s": max(completions) if completions else math.nan,
            "queue_wait_median_s": statistics.median(job["queue_wait_s"] or 0.0 for job in done) if done else math.nan,
            "restarts": sum(len(job.get("recoveries", [])) for job in done), "series": samples}


def run_live_kill(*, workdir: Path) -> dict[str, Any]:
    """One elastic ``[1, 2]`` run on a cluster that keeps 2 nodes up; once it has stepped on both past a
    checkpoint, lose a node holding one of its workers (:func:`kill_raylet`). Reports the steps the restart that
    followed lost against the checkpoint interval.
    """
    from llmstack.fleet.live import LiveJob, kill_outcome
    from llmstack.fleet.local_cluster import kill_raylet, local_autoscaling_cluster, train_workers, worker_nodes

    row = LiveJob("kill-0", "-", 0.0, 2, LIVE_KILL_STEPS)
    env = live_env()
    killed_at, killed_node, step_seen = math.nan, None, None
    with local_autoscaling_cluster(min_nodes=2, max_nodes=2, env=env, idle_timeout_s=LIVE_IDLE_TIMEOUT_S) as cluster:
        runs = LiveRuns(workdir, env, cluster.gcs_address, elastic=True)
        started = time.time()
        runs.start(row)
        log(f"kill +0 s: submitted {row.name} ({row.steps} steps, [1, 2] workers, checkpoint every "
            f"{LIVE_CHECKPOINT_EVERY})")
        try:
            last_report = -math.inf
            while time.time() - started < LIVE_KILL_BOUND_S and not runs.poll():
                now = time.time() - started
                with contextlib.suppress(Exception):
                    workers = train_workers(cluster.dashboard)
                    if now - last_report >= 10.0:
                        last_report = now
                        log(f"kill +{now:4.0f} s: {len(worker_nodes(cluster.dashboard))} worker node(s), "
                            f"{len(workers)} Train worker(s)")
                    paired = [r["step"] for r in runs.history(row.name) if r.get("workers") == 2]
                    if killed_node is None and paired and max(paired) > LIVE_CHECKPOINT_EVERY:
                        node = workers[-1]["node_id"]
                        on_node = {w.get("pid") for w in workers if w["node_id"] == node}
                        killed_at, step_seen = time.time(), max(paired)
                        killed = kill_raylet(node, cluster.temp_dir)
                        killed_node = node
                        log(f"kill +{now:4.0f} s: lost node {node[-8:]} ({len(killed)} processes SIGKILLed, its Train "
                            f"worker among them: {on_node <= set(killed)}; the run's metrics file showed step "
                            f"{step_seen} on 2 workers)")
                time.sleep(1.0)
            log(f"kill +{time.time() - started:4.0f} s: {row.name} ended (rc {runs.drivers[row.name].returncode})")
        finally:
            span = time.time() - started
            runs.stop_all()
    job = runs.outcome(row)
    outcome = kill_outcome(job.get("recoveries", []), killed_at=killed_at, checkpoint_every=LIVE_CHECKPOINT_EVERY)
    log(f"kill: steps lost {outcome['steps_lost']} (checkpoint interval {LIVE_CHECKPOINT_EVERY}); "
        f"restarts {[(r['resumed_from_step'], r['steps_lost']) for r in job.get('recoveries', [])]}")
    return {"job": job, "kill_steps": LIVE_KILL_STEPS, "killed_node": killed_node,
            "step_seen_before_kill": step_seen, "killed_after_s": killed_at - started, "wall_s": span, **outcome}


def run_live(parts: tuple[str, ...] = LIVE_PARTS, jobs: int = LIVE_JOBS) -> dict[str, Any]:
    import tempfile

    started = time.perf_counter()
    rows = live_rows(jobs)
    log("live slice: " + ", ".join(f"{r.name} at +{r.offset_s:.0f} s, {r.max_workers} workers, {r.steps} steps"
                                   for r in rows))
    setups_run = []
    for part, name in zip(LIVE_PARTS, SETUP_NAMES[:3]):
        if part not in parts:
            continue
        with tempfile.TemporaryDirectory(prefix="fleet-live-") as workdir:
            result = run_live_setup(name, rows, workdir=Path(workdir))
        log(f"{name}: {result['jobs_done']}/{len(rows)} jobs in {result['wall_s']:.0f} s, util "
            f"{result['utilisation']:.0%}, node-s {result['node_s']:.0f}, busy worker-s "
            f"{result['busy_worker_s']:.0f}, median completion {result['completion_median_s']:.0f} s "
            f"({time.perf_counter() - started:.0f} s into the part)")
        for job in result["jobs"]:
            if job.get("log_tail"):
                log(f"{job['name']} {job['status']}: ...{job['log_tail'][-600:]}")
        setups_run.append(result)
    kill = None
    if "kill" in parts:
        with tempfile.TemporaryDirectory(prefix="fleet-kill-") as workdir:
            kill = run_live_kill(workdir=Path(workdir))
        if kill["job"].get("log_tail"):
            log(f"kill-0 {kill['job']['status']}: ...{kill['job']['log_tail'][-600:]}")
    return {"part": "live", "slice": [dataclasses.asdict(r) for r in rows], "nodes": list(LIVE_NODES),
            "idle_timeout_s": LIVE_IDLE_TIMEOUT_S, "device_s_per_micro_batch": LIVE_DEVICE_S,
            "checkpoint_every": LIVE_CHECKPOINT_EVERY, "bound_s": LIVE_SETUP_BOUND_S, "kill_steps": LIVE_KILL_STEPS,
            "parts": list(parts), "setups": setups_run, "kill": kill, "load_average": os.getloadavg(),
            "wall_s": time.perf_counter() - started}


def live_markdown(results: dict[str, Any]) -> str:
    low, high = results["nodes"]
    lines = ["## fleet (live)", "",
             f"The simulator's first three setups on a real local autoscaling cluster (`llmstack.fleet.local_cluster`: "
             f"Ray's autoscaler over its fake multi-node provider; a head with no CPUs and {low}-{high} one-CPU worker "
             f"nodes, idle timeout {results['idle_timeout_s']:.0f} s; static keeps {high} up), each running "
             f"{len(results['slice'])} jobs of the seed-0 trace from 09:00 (arrivals {LIVE_TIME_SCALE:.0f}x closer, "
             "at most 2 workers, tiny preset, global batch fixed at every worker count; each run is "
             "`python -m llmstack train` with `RAY_ADDRESS`, the entrypoint a Ray Job runs). Each micro-batch "
             f"includes {results['device_s_per_micro_batch']} s of emulated accelerator time "
             "(`LLMSTACK_EMULATED_DEVICE_S`, a sleep inside the step's timing): on this machine's 2 shared cores "
             "the fake nodes' real CPU steps would measure contention between them, not scheduling. A setup waits "
             f"for all its jobs (at most {results['bound_s']:.0f} s). Node-seconds are sampled each second from "
             "the state API over the setup's span (first submission to last job end); busy worker-seconds are the "
             "jobs' own (time inside optimizer steps x workers, replayed steps included, from their registry "
             "manifests); idle node-s = node-s - Train-worker actor-s (one-CPU nodes). Fake nodes join in "
             "seconds (a cloud node takes minutes) and a worker group starts in seconds-to-tens-of-seconds "
             "on these cores, against jobs of seconds, so these figures show the ranking, not the "
             "simulator's levels.",
             "", "| setup | jobs done | span (s) | node-s | idle node-s | busy worker-s | utilisation "
             "| completion median / max (s) | queue wait median (s) | restarts |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s in results["setups"]:
        lines.append(f"| {s['setup']} | {s['jobs_done']}/{len(s['jobs'])} | {s['wall_s']:.0f} | {s['node_s']:.0f} "
                     f"| {s['idle_node_s']:.0f} | {s['busy_worker_s']:.0f} | {s['utilisation']:.1%} "
                     f"| {s['completion_median_s']:.0f} / {s['completion_max_s']:.0f} "
                     f"| {s['queue_wait_median_s']:.0f} | {s['restarts']} |")
    if results["setups"]:
        ranked = sorted(results["setups"], key=lambda s: -s["utilisation"])
        ranking = " > ".join(f"{s['setup']} ({s['utilisation']:.1%})" for s in ranked)
        complete = all(s["jobs_done"] == len(s["jobs"]) for s in results["setups"])
        agrees = [s["setup"] for s in ranked] == list(reversed(SETUP_NAMES[:3]))
        if complete and len(results["setups"]) == 3:
            lines += ["", f"Every job of every setup finished. Ranking by utilisation: {ranking}; the simulator's "
                      f"day ranks autoscaling + elastic > autoscaling + fixed > static: "
                      f"{'the same order' if agrees else '**a different order**'}."]
            lines += ["", _overhead_reading(results["setups"])]
        elif not complete:
            short = ", ".join(f"{s['setup']} ({s['jobs_done']}/{len(s['jobs'])})" for s in results["setups"]
                              if s["jobs_done"] < len(s["jobs"]))
            lines += ["", f"**Not conclusive.** Not every job finished within the {results['bound_s']:.0f} s "
                      f"bound ({short}; the rest were stopped there and count with the steps they ran): ranking "
                      f"{ranking}."]
    kill = results.get("kill")
    if kill:
        recovery = ("" if kill.get("recovery_s") is None else f", its new worker group starting "
                    f"{kill['recovery_s']:.0f} s after the kill")
        restarts = "; ".join(f"from step {r['resumed_from_step']} (last seen {r['last_step_seen']}, lost "
                             f"{r['steps_lost']})" for r in kill["job"].get("recoveries", []))
        lines += ["", f"**A node lost mid-run.** One elastic `[1, 2]` job of {kill['kill_steps']} steps on a "
                  f"cluster keeping 2 nodes, checkpoint every {kill['checkpoint_every']} steps: once it stepped on "
                  f"both nodes past a checkpoint (step {kill['step_seen_before_kill']} in its metrics file, which "
                  "its driver rewrites every 10 s), a node holding one of its workers was lost without notice "
                  f"({kill['killed_after_s']:.0f} s in: its raylet and the node's other processes SIGKILLed). The "
                  f"restart that followed lost **{kill['steps_lost']} step(s)** against a checkpoint interval of "
                  f"{kill['checkpoint_every']} ({'within' if kill['within_one_interval'] else '**beyond**'} one "
                  f"interval){recovery}; the job ended {kill['job']['status']}. Its restarts: {restarts or 'none'}."]
    lines += ["", "Jobs: " + "; ".join(f"{r['name']} ({r['trace_job']}) at +{r['offset_s']:.0f} s, "
                                       f"{r['max_workers']} worker(s), {r['steps']} steps" for r in results["slice"]),
              "", f"Reproduce: `flock /tmp/llmstack-ray.lock timeout 1200 env PYTHONPATH=src python "
              f"benchmarks/fleet_bench.py --part live` (ran in {results['wall_s']:.0f} s here, load average "
              f"{results['load_average'][0]:.1f} at the end). JSON: `benchmarks/results/fleet_live.json`."]
    return "\n".join(lines) + "\n"


def _overhead_reading(setups: list[dict[str, Any]]) -> str:
    """Per setup, the Train worker-seconds of a job that were not steps (worker group starts, resizes, checkpoint
    loads) against the job's busy worker-seconds: what decides whether resizing pays on jobs this short."""
    import statistics

    parts, start_share = [], None
    for setup in setups:
        jobs = setup["jobs"]
        overhead = statistics.median(j["worker_seconds"] - j["busy_worker_seconds"] for j in jobs)
        busy = statistics.median(j["busy_worker_seconds"] for j in jobs)
        parts.append(f"{setup['setup']} {overhead:.0f} s beside {busy:.0f} s of steps ({setup['restarts']} "
                     "restarts in all)")
        if setup["restarts"] == 0 and busy > 0:
            start_share = overhead / busy if start_share is None else min(start_share, overhead / busy)
    return ("Per job (median), Train worker-seconds that were not steps (worker-group starts, resizes, checkpoint "
            "loads): " + "; ".join(parts) + ". The simulator charges 30 s per (re)start against jobs of a 20-minute "
            f"median (~2.5%); here a job's one start costs {start_share or 0:.0%} of its stepping, so each elastic resize "
            "(a restart of the worker group) weighs that much again. The live run checks the mechanics (queueing, "
            "autoscaling, resizing, recovery on Ray's real autoscaler), not the simulator's levels.")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=("sim", "live"), default="sim",
                        help="sim: the simulator on generated days; live: a slice of the trace on a local "
                             "autoscaling Ray cluster (starts Ray: run it under the shared lock)")
    parser.add_argument("--live-parts", default=None,
                        help=f"live: comma-separated subset of {','.join(LIVE_PARTS)} (default all; with --quick "
                             "elastic,kill)")
    parser.add_argument("--quick", action="store_true",
                        help="live smoke run: 2 jobs instead of 4; writes fleet_live_quick.json and leaves "
                             "RESULTS.md alone")
    parser.add_argument("--render-only", action="store_true", help="re-render RESULTS.md from the part's JSON")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.part == "sim":
        name, run, render, section = "fleet.json", run_sim, markdown, "fleet (simulated)"
    else:
        chosen = args.live_parts or ("elastic,kill" if args.quick else ",".join(LIVE_PARTS))
        parts = tuple(p for p in chosen.split(",") if p)
        unknown = sorted(set(parts) - set(LIVE_PARTS))
        if unknown:
            parser.error(f"--live-parts: unknown {unknown}; choose from {','.join(LIVE_PARTS)}")
        name, render, section = ("fleet_live_quick.json" if args.quick else "fleet_live.json"), live_markdown, \
            "fleet (live)"
        run = functools.partial(run_live, parts, 2 if args.quick else LIVE_JOBS)
    if not args.render_only:
        (RESULTS / name).write_text(json.dumps(run(), indent=1, default=_json_default))
    results = json.loads((RESULTS / name).read_text())
    if args.quick:
        print(render(results))
        log(f"wrote {RESULTS / name} (quick: RESULTS.md left alone)")
        return 0
    write_section(section, render(results))
    log(f"wrote {RESULTS / name} and the RESULTS.md section {section!r}")
    return 0


def _json_default(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


if __name__ == "__main__":
    sys.exit(main())
