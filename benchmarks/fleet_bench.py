"""Fleet benchmark: a day of training and fine-tuning jobs on one cluster, four provisioning setups.

``--part sim`` (the only part so far) generates a day of job arrivals (llmstack.fleet.generate_day: diurnal
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

Reproduce: python benchmarks/fleet_bench.py --part sim     (about 1.5 minutes on 2 busy CPU cores)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=("sim",), default="sim",
                        help="sim: the simulator on generated days (the live AutoscalingCluster part is not built yet)")
    parser.add_argument("--render-only", action="store_true", help="re-render RESULTS.md from fleet.json")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.render_only:
        results = json.loads((RESULTS / "fleet.json").read_text())
    else:
        results = run_sim()
        (RESULTS / "fleet.json").write_text(json.dumps(results, indent=1, default=_json_default))
        results = json.loads((RESULTS / "fleet.json").read_text())
    write_section("fleet (simulated)", markdown(results))
    log(f"wrote {RESULTS / 'fleet.json'}, fleet_sim.png and the RESULTS.md section")
    return 0


def _json_default(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


if __name__ == "__main__":
    sys.exit(main())
