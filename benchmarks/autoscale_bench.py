"""Autoscaling benchmark: static provisioning at peak vs Ray Serve's reactive policy vs llmstack's predictive one.

Measured in one run, against baselines from the same run:

1. calibration: the tiny model's engine in-process (prefill tokens/s, decode step at batch 1 and 8), the
   HTTP overhead per request and the replica start-up time on the live app, and from those the per-replica
   capacity (tokens/s with 99% of TTFTs within the SLO) in the simulator;
2. live: a 10-minute window of the Azure code trace, compressed x8 and clipped to the model's window,
   replayed over HTTP against a real Serve app (1-3 replicas) under each of the three policies;
3. the simulator on the same window with the calibrated replica: does its ranking hold live?
4. the simulator on the whole hour (recorded arrivals and token counts): replica-seconds, idle
   replica-seconds, utilisation, SLO attainment, scale events, a sweep of each policy's knob (the
   replica-seconds/SLO frontier) and transition detection (predicted vs afterwards-found ramps).

Writes benchmarks/results/autoscale.json, autoscale_hour.png, autoscale_frontier.png, autoscale_live.png
and the ``## autoscale`` section of benchmarks/RESULTS.md.

Reproduce: python benchmarks/autoscale_bench.py          (about 8 minutes on 2 CPU cores)
           python benchmarks/autoscale_bench.py --skip-live   (simulator only, about 2 minutes)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from _common import cpu_name, free_port, write_section  # noqa: E402

HERE = Path(__file__).parent
RESULTS = HERE / "results"
TRACE = Path(__file__).resolve().parents[1].parent / "shared" / "traces" / "azure_llm_2023_code.csv"
TRACE_CREDIT = ("Azure LLM inference trace 2023 (code), CC-BY 4.0: Patel et al., \"Splitwise: Efficient generative "
                "LLM inference using phase splitting\", ISCA 2024")
SLO_S = 1.5
HOUR_MAX_REPLICAS = 12
LIVE_MAX_REPLICAS = 3
LIVE_WINDOW_START_S, LIVE_WINDOW_S, LIVE_SPEEDUP = 2100.0, 600.0, 8.0
LIVE_OUTPUT_CAP = 64


def log(msg: str) -> None:
    print(f"[autoscale-bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- policy configs


def reactive_config(max_replicas: int, **extra: Any) -> Any:
    from llmstack.config import AutoscalingConfig

    return AutoscalingConfig(**{"min_replicas": 1, "max_replicas": max_replicas, "ttft_slo_s": SLO_S, **extra})


def predictive_config(max_replicas: int, capacity: float, startup_s: float, **extra: Any) -> Any:
    from llmstack.config import AutoscalingConfig

    fields = {"min_replicas": 1, "max_replicas": max_replicas, "ttft_slo_s": SLO_S, "policy": "predictive",
              "capacity_tokens_per_s": capacity, "forecast_bin_s": 1.0,
              "forecast_horizon_s": round(max(2.0, startup_s + 1.0), 1), "look_back_period_s": 2.0,
              "metrics_interval_s": 0.5, "headroom": 0.3, "downscale_stable_s": 60.0, "downscale_cooldown_s": 20.0}
    fields.update(extra)
    return AutoscalingConfig(**fields)


PREDICTIVE_SWEEP = [(0.0, 15.0), (0.2, 30.0), (0.2, 60.0), (0.5, 60.0), (0.5, 120.0), (0.8, 120.0)]
REACTIVE_SWEEP = [1.0, 2.0, 4.0]
RAY_DEFAULTS = {"target_ongoing_requests": 2.0, "upscale_delay_s": 30.0, "downscale_delay_s": 600.0,
                "look_back_period_s": 30.0}


# --------------------------------------------------------------------------- live part


class ReplicaWatcher:
    """Polls Serve's status: (t, running, starting) every 0.25 s, for replica-seconds and start-up times."""

    def __init__(self, app_name: str) -> None:
        self.app_name = app_name
        self.samples: list[tuple[float, int, int]] = []
        self._stop = threading.Event()
        self._start = time.perf_counter()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from ray import serve

        while not self._stop.is_set():
            try:
                app = serve.status().applications.get(self.app_name)
                states = app.deployments["LLMServer"].replica_states if app else {}
                self.samples.append((time.perf_counter() - self._start, int(states.get("RUNNING", 0)),
                                     int(states.get("STARTING", 0))))
            except Exception:
                pass
            self._stop.wait(0.25)

    def stop(self) -> list[tuple[float, int, int]]:
        self._stop.set()
        self._thread.join(timeout=5)
        return self.samples

    @staticmethod
    def startup_times(samples: list[tuple[float, int, int]]) -> list[float]:
        """For each replica that went STARTING -> RUNNING: how long it was STARTING (pending included)."""
        times, pending = [], []
        prev_running, prev_starting = None, 0
        for t, running, starting in samples:
            if prev_running is not None:
                for _ in range(max(0, starting - prev_starting)):
                    pending.append(t)
                for _ in range(max(0, running - prev_running)):
                    if pending:
                        times.append(t - pending.pop(0))
            prev_running, prev_starting = running, starting
        return times


def live_part(registry_info: dict, port: int, window: Any, runs: dict[str, Any]) -> dict[str, Any]:
    import llmstack
    from llmstack.autoscale import replay, serve_replica_probe
    from llmstack.config import to_dict

    out: dict[str, Any] = {}
    for name, auto in runs.items():
        app_name, prefix = f"auto-{name}", f"/auto-{name}"
        url = f"http://127.0.0.1:{port}{prefix}"
        if auto.policy == "predictive":
            auto = dataclasses.replace(auto, metrics_url=url)
        log(f"live {name}: deploying ({auto.min_replicas}-{auto.max_replicas} replicas)")
        deployment = llmstack.deploy({"model": registry_info["model"], "registry": registry_info["registry"].url,
                                      "app_name": app_name, "route_prefix": prefix, "port": port,
                                      "max_batch_size": 8, "max_ongoing_requests": 32, "max_queued_requests": 256,
                                      "response_cache_size": 0, "request_timeout_s": 30.0,
                                      "autoscaling": to_dict(auto)})
        watcher = ReplicaWatcher(app_name)
        try:
            log(f"live {name}: replaying {len(window)} requests over {window.duration_s / LIVE_SPEEDUP:.0f} s")
            result = replay(window, deployment.url, speedup=LIVE_SPEEDUP, ttft_slo_s=SLO_S, max_requests=None,
                            max_duration_s=window.duration_s / LIVE_SPEEDUP + 25.0, request_timeout_s=30.0,
                            max_output_tokens=LIVE_OUTPUT_CAP,
                            replica_probe=serve_replica_probe(app_name, include_starting=True), progress=False)
        finally:
            samples = watcher.stop()
            deployment.shutdown()
        out[name] = {"config": to_dict(auto), "metrics": result.metrics, "replicas": result.replicas,
                     "records": [{k: r[k] for k in ("arrival_s", "ttft_s", "latency_s", "status")}
                                 for r in result.records],
                     "startup_s": ReplicaWatcher.startup_times(samples)}
        log(f"live {name}: {json.dumps({k: result.metrics[k] for k in ('replica_seconds', 'slo_attainment', 'ttft_p99_s', 'peak_replicas', 'statuses')})}")
    return out


def http_overhead(url: str) -> float:
    """Median TTFT over HTTP of 12 one-token requests with an 8-token prompt at low load."""
    from llmstack.autoscale import Trace, replay

    trace = Trace([0.3 * i for i in range(12)], [8] * 12, [1] * 12)
    result = replay(trace, url, ttft_slo_s=SLO_S, max_duration_s=30.0, progress=False)
    return float(result.metrics["ttft_p50_s"] or 0.0)


# --------------------------------------------------------------------------- simulator part


def sim(trace: Any, auto: Any, policy: str, model: Any, static: int | None = None) -> Any:
    from llmstack.autoscale.simulator import simulate

    return simulate(trace, auto, policy=policy, replica_model=model, static_replicas=static)


def hour_part(hour: Any, model: Any, capacity: float) -> dict[str, Any]:
    from llmstack.autoscale.transitions import detect_ramps, predicted_ramp_times, score_transitions

    log("hour: static fleets 1..%d" % HOUR_MAX_REPLICAS)
    static_runs = {n: sim(hour, reactive_config(n), "static", model, n) for n in range(1, HOUR_MAX_REPLICAS + 1)}
    meeting = [n for n, r in static_runs.items() if r.metrics["slo_attainment"] >= 0.99]
    peak_n = meeting[0] if meeting else HOUR_MAX_REPLICAS
    log(f"hour: static at peak = {peak_n} replicas; reactive sweep")
    reactive_runs = {f"target_ongoing={t:g}": sim(hour, reactive_config(HOUR_MAX_REPLICAS, target_ongoing_requests=t),
                                                  "reactive", model) for t in REACTIVE_SWEEP}
    reactive_runs["Ray defaults"] = sim(hour, reactive_config(HOUR_MAX_REPLICAS, **RAY_DEFAULTS), "reactive", model)
    log("hour: predictive sweep")
    predictive_runs = {}
    for headroom, stable in PREDICTIVE_SWEEP:
        auto = predictive_config(HOUR_MAX_REPLICAS, capacity, model.startup_s, headroom=headroom,
                                 downscale_stable_s=stable)
        predictive_runs[f"headroom={headroom:g},stable={stable:g}s"] = (auto, sim(hour, auto, "predictive", model))
    ok = {k: v for k, v in predictive_runs.items() if v[1].metrics["slo_attainment"] >= 0.99}
    pool = ok or predictive_runs
    best_key = (min(pool, key=lambda k: pool[k][1].metrics["replica_seconds"]) if ok
                else max(pool, key=lambda k: pool[k][1].metrics["slo_attainment"]))
    best_auto, best = predictive_runs[best_key]
    reactive = reactive_runs["target_ongoing=4"]
    # Predictive at no more replica-seconds than the reactive default: the sweep point with the best SLO.
    cheaper = {k: v for k, v in predictive_runs.items()
               if v[1].metrics["replica_seconds"] <= reactive.metrics["replica_seconds"]}
    matched_key = max(cheaper, key=lambda k: cheaper[k][1].metrics["slo_attainment"]) if cheaper else None
    # How much of the gap is start-up time: the same configs with a replica that starts in 2 s.
    fast = dataclasses.replace(model, startup_s=2.0)
    fast_auto = dataclasses.replace(best_auto, forecast_horizon_s=3.0)
    startup_sensitivity = {"startup_s": fast.startup_s,
                           "static": sim(hour, reactive_config(peak_n), "static", fast, peak_n).metrics,
                           "reactive": sim(hour, reactive_config(HOUR_MAX_REPLICAS, target_ongoing_requests=4.0),
                                           "reactive", fast).metrics,
                           "predictive": sim(hour, fast_auto, "predictive", fast).metrics}
    ramps = detect_ramps(best.timeline["tokens"], capacity_tokens_per_s=capacity, headroom=best_auto.headroom)
    transitions = score_transitions(ramps, predicted_ramp_times(best.decisions))
    headline = {"static": static_runs[peak_n], "reactive": reactive, "predictive": best}
    plot_hour(headline, peak_n, best_key)
    plot_frontier(static_runs, reactive_runs, predictive_runs, best_key, peak_n)
    return {
        "static_at_peak_replicas": peak_n,
        "predictive_choice": best_key,
        "predictive_config": dataclasses.asdict(best_auto),
        "headline": {k: v.metrics for k, v in headline.items()},
        "matched": {"predictive": matched_key,
                    "metrics": cheaper[matched_key][1].metrics if matched_key else None},
        "sweeps": {"static": {str(n): r.metrics for n, r in static_runs.items()},
                   "reactive": {k: r.metrics for k, r in reactive_runs.items()},
                   "predictive": {k: v[1].metrics for k, v in predictive_runs.items()}},
        "transitions": transitions,
        "startup_sensitivity": startup_sensitivity,
    }


def plot_hour(headline: dict[str, Any], peak_n: int, best_key: str) -> None:
    from llmstack.autoscale.plots import plot_runs, simulation_series

    names = {"static": f"static at peak ({peak_n})", "reactive": "reactive (Ray's queue-depth policy)",
             "predictive": f"predictive ({best_key})"}
    plot_runs([simulation_series(r, names[k]) for k, r in headline.items()], RESULTS / "autoscale_hour.png",
              ttft_slo_s=SLO_S, title="Azure code trace, full hour, simulator (calibrated tiny replica)")


def plot_frontier(static_runs: dict, reactive_runs: dict, predictive_runs: dict, best_key: str, peak_n: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    xs = [r.metrics["replica_seconds"] / 3600 for r in static_runs.values()]
    ax.plot(xs, [r.metrics["slo_attainment"] for r in static_runs.values()], "o-", label="static N=1..%d" % len(xs))
    for label, runs, marker in (("reactive (target_ongoing sweep, Ray defaults)", reactive_runs, "s"),
                                ("predictive (headroom, hold sweep)", {k: v[1] for k, v in predictive_runs.items()}, "^")):
        ax.scatter([r.metrics["replica_seconds"] / 3600 for r in runs.values()],
                   [r.metrics["slo_attainment"] for r in runs.values()], marker=marker, s=50, label=label)
    ax.axhline(0.99, color="red", linestyle="--", linewidth=1, label="99% SLO attainment")
    ax.set_xlabel("replica-hours for the trace hour")
    ax.set_ylabel(f"SLO attainment (TTFT <= {SLO_S:g} s)")
    ax.set_title("Cost vs SLO, full hour in the simulator")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(RESULTS / "autoscale_frontier.png", dpi=110)
    plt.close(fig)


def plot_live(live: dict[str, Any]) -> None:
    from llmstack.autoscale.plots import RunSeries, plot_runs

    series = []
    for name, run in live.items():
        records = run["records"]
        seconds = int(max(r["arrival_s"] for r in records)) + 1
        load = [0.0] * seconds
        for r in records:
            load[int(r["arrival_s"])] += 1
        points = [(r["arrival_s"], r["ttft_s"]) for r in records if r["ttft_s"] is not None]
        series.append(RunSeries(name, load=(list(range(seconds)), load),
                                replicas=([t for t, _ in run["replicas"]], [n for _, n in run["replicas"]]),
                                ttft=([p[0] for p in points], [p[1] for p in points])))
    plot_runs(series, RESULTS / "autoscale_live.png", ttft_slo_s=SLO_S,
              title=f"Live Serve app: trace window {LIVE_WINDOW_START_S:.0f}-{LIVE_WINDOW_START_S + LIVE_WINDOW_S:.0f} s "
                    f"x{LIVE_SPEEDUP:g}, tiny model")


# --------------------------------------------------------------------------- report


def _ranking(metrics: dict[str, dict[str, Any]], key: str, reverse: bool) -> list[str]:
    return sorted(metrics, key=lambda k: metrics[k][key], reverse=reverse)


def markdown(results: dict[str, Any]) -> str:
    hour = results["hour"]
    head = hour["headline"]
    static, reactive, predictive = head["static"], head["reactive"], head["predictive"]
    idle_cut = 1 - predictive["idle_replica_seconds"] / static["idle_replica_seconds"]
    cal = results["calibration"]
    model = cal["replica_model"]
    lines = [
        "## autoscale",
        "",
        f"Reproduce: `python benchmarks/autoscale_bench.py` ({results['machine']}; {results['wall_s']:.0f} s). "
        f"Trace: {TRACE_CREDIT}; the hour has {head['static']['requests']} requests, in bursts of up to 67/s "
        "separated by idle gaps. Raw numbers: `benchmarks/results/autoscale.json`.",
        "",
        f"**Calibration** (measured in this run): the tiny model's engine prefills {model['prefill_tokens_per_s']:.0f} "
        f"tokens/s and decodes a step in {model['decode_step_s'] * 1e3:.2f} ms (+{model['decode_step_per_seq_s'] * 1e3:.3f} ms "
        f"per extra sequence); a request costs {model['request_overhead_s'] * 1e3:.0f} ms of HTTP/proxy overhead and a "
        f"new replica took {model['startup_s']:.1f} s to start on the live app. In the simulator one such replica "
        f"sustains {cal['capacity_hour']:.0f} tokens/s of the trace's mix (and {cal['capacity_window']:.0f} of the "
        f"clipped live mix) with 99% of TTFTs within {SLO_S:g} s: the predictive policy's `capacity_tokens_per_s`.",
        "",
        f"**Full hour, simulator** (recorded arrivals and token counts, TTFT SLO {SLO_S:g} s, 1-{HOUR_MAX_REPLICAS} "
        "replicas; `autoscale_hour.png`):",
        "",
        "| policy | replica-s | idle replica-s | utilisation | SLO attainment | SLO misses | scale events | peak |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    labels = {"static": f"static at peak ({hour['static_at_peak_replicas']} replicas: the smallest fleet with >= 99%)",
              "reactive": "reactive: Ray's queue-depth policy (target_ongoing 4, delays 2 s / 10 s, look-back 10 s)",
              "predictive": f"predictive ({hour['predictive_choice']})"}
    for key in ("static", "reactive", "predictive"):
        m = head[key]
        lines.append(f"| {labels[key]} | {m['replica_seconds']:.0f} | {m['idle_replica_seconds']:.0f} | "
                     f"{m['utilization']:.1%} | {m['slo_attainment']:.2%} | {m['slo_misses']} | {m['scale_events']} | "
                     f"{m['peak_replicas']} |")
    matched = hour["matched"]
    t = hour["transitions"]
    lines += [
        "",
        "Against the targets:",
        f"- predictive vs static at peak: **{idle_cut:.0%} fewer idle replica-seconds** (target >= 60%) at "
        f"{predictive['slo_attainment']:.2%} SLO attainment (target >= 99%), "
        f"{predictive['replica_seconds'] / static['replica_seconds']:.2f}x the replica-seconds.",
    ]
    if matched["predictive"]:
        mm = matched["metrics"]
        lines.append(f"- predictive vs reactive at no more replica-seconds: predictive `{matched['predictive']}` "
                     f"uses {mm['replica_seconds']:.0f} replica-s (reactive {reactive['replica_seconds']:.0f}) and misses "
                     f"{mm['slo_misses']} SLOs vs reactive's {reactive['slo_misses']} "
                     f"({reactive['slo_misses'] / max(1, mm['slo_misses']):.1f}x fewer).")
    else:
        lines.append("- predictive vs reactive at no more replica-seconds: no predictive sweep point was as cheap as "
                     f"reactive ({reactive['replica_seconds']:.0f} replica-s).")
    lines += [
        f"- utilisation (busy time / replica time): predictive {predictive['utilization']:.1%}, reactive "
        f"{reactive['utilization']:.1%}, static {static['utilization']:.1%} (target >= 75%).",
        f"- transitions: {t['ramps']} ramps found afterwards in the trace (needed replicas up by >= 2 over the "
        f"previous 30 s), {t['predicted']} forecast-driven scale-ups; precision {t['precision']}, recall "
        f"{t['recall']}, median lead {t['lead_s_median']} s (a prediction counts when it comes <= 30 s before a "
        "ramp, or <= 2 s after).",
        "",
        f"With a replica that starts in {hour['startup_sensitivity']['startup_s']:g} s instead (same configs): "
        + ", ".join(f"{k} {hour['startup_sensitivity'][k]['replica_seconds']:.0f} replica-s at "
                    f"{hour['startup_sensitivity'][k]['slo_attainment']:.2%}" for k in ("static", "reactive", "predictive"))
        + ".",
        "",
        "Sweeps (`autoscale_frontier.png`, replica-hours vs SLO attainment):",
        "",
        "| run | replica-s | SLO attainment | utilisation | scale events |",
        "|---|---:|---:|---:|---:|",
    ]
    for family in ("reactive", "predictive"):
        for key, m in hour["sweeps"][family].items():
            lines.append(f"| {family} {key} | {m['replica_seconds']:.0f} | {m['slo_attainment']:.2%} | "
                         f"{m['utilization']:.1%} | {m['scale_events']} |")
    statics = hour["sweeps"]["static"]
    lines.append("| static N: SLO | " + ", ".join(f"{n}: {m['slo_attainment']:.1%}" for n, m in statics.items())
                 + " | | | |")
    live = results.get("live")
    if live:
        sim_window = results["window_sim"]
        lines += [
            "",
            f"**Live vs simulator** (trace window {LIVE_WINDOW_START_S:.0f}-{LIVE_WINDOW_START_S + LIVE_WINDOW_S:.0f} s, "
            f"{live['static']['metrics']['requests']} requests, compressed x{LIVE_SPEEDUP:g}, prompts clipped to the tiny "
            f"model's window and outputs to {LIVE_OUTPUT_CAP} tokens; a real Serve app with 1-{LIVE_MAX_REPLICAS} replicas; "
            "`autoscale_live.png`):",
            "",
            "| policy | live replica-s | live SLO attainment | live TTFT p99 | sim replica-s | sim SLO attainment |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for key in ("static", "reactive", "predictive"):
            lm, sm = live[key]["metrics"], sim_window[key]
            lines.append(f"| {key} | {lm['replica_seconds']:.0f} | {lm['slo_attainment']:.2%} | {lm['ttft_p99_s']} s | "
                         f"{sm['replica_seconds']:.0f} | {sm['slo_attainment']:.2%} |")
        live_m = {k: v["metrics"] for k, v in live.items()}
        rank = {"live": (_ranking(live_m, "replica_seconds", False), _ranking(live_m, "slo_attainment", True)),
                "sim": (_ranking(sim_window, "replica_seconds", False), _ranking(sim_window, "slo_attainment", True))}
        lines += [
            "",
            f"Ranking by replica-seconds (fewest first): live {' < '.join(rank['live'][0])}, simulator "
            f"{' < '.join(rank['sim'][0])}; by SLO attainment (best first): live {' > '.join(rank['live'][1])}, "
            f"simulator {' > '.join(rank['sim'][1])}. "
            + ("The simulator's ranking holds on both." if rank["live"] == rank["sim"] else
               "The rankings differ where marked above."),
        ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip-live", action="store_true", help="simulator only (calibration without Serve)")
    parser.add_argument("--render-only", action="store_true", help="re-render RESULTS.md from autoscale.json")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.render_only:
        write_section("autoscale", markdown(json.loads((RESULTS / "autoscale.json").read_text())))
        return 0
    began = time.perf_counter()
    import torch

    torch.set_num_threads(1)
    from llmstack.autoscale import read_trace
    from llmstack.autoscale.simulator import calibrate_replica_model, replica_capacity
    from llmstack.serve._testing import make_registry
    from llmstack.serve.engine import TransformersEngine

    hour = read_trace(TRACE)
    tmp = tempfile.mkdtemp(prefix="autoscale-bench-")
    info = make_registry(f"{tmp}/registry", adapters=0)
    engine = TransformersEngine.from_source(info["model"], registry=info["registry"], cache_size=0)
    window_len = engine.max_model_len
    log("calibrating the engine in-process")
    engine_model = calibrate_replica_model(engine, startup_s=5.0)
    engine.shutdown()
    window = hour.window(start_s=LIVE_WINDOW_START_S, duration_s=LIVE_WINDOW_S).clipped(
        context_window=window_len, max_output_tokens=LIVE_OUTPUT_CAP)
    results: dict[str, Any] = {"machine": f"{cpu_name()}, 2 shared cores", "trace": str(TRACE),
                               "trace_credit": TRACE_CREDIT, "slo_s": SLO_S}
    startup_s, overhead_s = 5.0, 0.02
    live_runs: dict[str, Any] = {}
    if not args.skip_live:
        import ray
        from ray import serve

        ray.init(num_cpus=LIVE_MAX_REPLICAS + 1, object_store_memory=300_000_000, include_dashboard=False,
                 log_to_driver=False, runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false",
                                                                "OMP_NUM_THREADS": "1"}})
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        # Capacity for the live predictive policy comes from a provisional model (start-up guessed 5 s);
        # the simulator comparison below uses the start-up measured here.
        capacity_window = replica_capacity(engine_model, ttft_slo_s=SLO_S, context_tokens=window.context_tokens,
                                           generated_tokens=window.generated_tokens)
        live_configs = {
            "static": reactive_config(LIVE_MAX_REPLICAS, min_replicas=LIVE_MAX_REPLICAS),
            "reactive": reactive_config(LIVE_MAX_REPLICAS),
            "predictive": predictive_config(LIVE_MAX_REPLICAS, capacity_window, 5.0, downscale_stable_s=20.0,
                                            downscale_cooldown_s=10.0),
        }
        import llmstack

        probe_app = llmstack.deploy({"model": info["model"], "registry": info["registry"].url, "app_name": "probe",
                                     "route_prefix": "/probe", "port": port, "response_cache_size": 0})
        overhead_s = max(0.0, http_overhead(probe_app.url) - engine_model.prefill_overhead_s
                         - 8 / engine_model.prefill_tokens_per_s)
        probe_app.shutdown()
        live_runs = live_part(info, port, window, live_configs)
        starts = [s for run in live_runs.values() for s in run["startup_s"]]
        if starts:
            startup_s = sorted(starts)[len(starts) // 2]
        serve.shutdown()
        ray.shutdown()
        results["live"] = live_runs
        plot_live(live_runs)
    model = dataclasses.replace(engine_model, startup_s=round(startup_s, 2), request_overhead_s=round(overhead_s, 4))
    log(f"replica model: {model}")
    capacity_hour = replica_capacity(model, ttft_slo_s=SLO_S, context_tokens=hour.context_tokens,
                                     generated_tokens=hour.generated_tokens)
    capacity_window = replica_capacity(model, ttft_slo_s=SLO_S, context_tokens=window.context_tokens,
                                       generated_tokens=window.generated_tokens)
    results["calibration"] = {"replica_model": model.to_dict(), "capacity_hour": capacity_hour,
                              "capacity_window": capacity_window, "startup_samples_s": sorted(
                                  s for run in live_runs.values() for s in run["startup_s"])}
    log(f"capacity: hour mix {capacity_hour:.0f} tokens/s, live mix {capacity_window:.0f} tokens/s")
    if live_runs:
        compressed = window.compressed(LIVE_SPEEDUP)
        results["window_sim"] = {}
        for name, run in live_runs.items():
            from llmstack.config import AutoscalingConfig, load_config

            auto = load_config(AutoscalingConfig, {**run["config"], "metrics_url": None})
            policy = "static" if name == "static" else auto.policy
            results["window_sim"][name] = sim(compressed, auto, policy, model,
                                              LIVE_MAX_REPLICAS if name == "static" else None).metrics
    results["hour"] = hour_part(hour, model, capacity_hour)
    results["wall_s"] = time.perf_counter() - began
    (RESULTS / "autoscale.json").write_text(json.dumps(results, indent=1, default=str))
    write_section("autoscale", markdown(results))
    log(f"done in {results['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
