"""Canary benchmark: rollback speed, failed requests and router overhead under steady HTTP load.

Measured in one run, on one machine, with baselines from the same run:

1. router overhead: the canary app (ingress -> router -> version) against the plain llmstack app
   (ingress -> model) serving the same model under the same closed-loop load: p50/p95 latency, throughput;
2. a deliberately broken candidate (test-only fault injection: raises / garbage output / 2 s slower), rolled
   back automatically: seconds from the first bad candidate response to 0% candidate traffic, requests
   failed vs requests routed to the candidate;
3. a healthy candidate through the whole plan (5 -> 25 -> 50 -> 100%) to promotion: failed requests;
4. a manual rollback during load: failed requests, time until no request reaches the old version;
5. shadow mode: mirrored requests, answers compared, none returned; stable latency with and without it;
6. starting a canary of a version the app does not serve yet (deployed as a side application).

Writes benchmarks/results/canary.json, canary_timeline.png and the ``## canary`` section of benchmarks/RESULTS.md.

Reproduce: python benchmarks/canary_bench.py            (about 4-5 minutes on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import RESULTS_DIR as RESULTS
from harness import logger, pct, write_json, write_section
from harness.cluster import start_ray, start_serve
from harness.loadgen import CompletionLoad, run_for
from harness.peers import wait_healthy
from harness.plots import pyplot

V1, V2 = "tiny-lm@v1", "tiny-lm@v2"
# The test-only fault-injecting deployment (llmstack.serve._faults), as a version's deployment class.
FAULTY = "llmstack.serve._faults:FaultInjectingLLMServer"
log = logger("canary-bench")


def canary_load(url: str, *, threads: int) -> CompletionLoad:
    """The canary load: ``threads`` closed-loop clients, 8 sampled tokens (temperature 0.8) per request."""
    return CompletionLoad(url, threads=threads, max_tokens=8, temperature=0.8)


def registry_with_versions(url: str) -> dict[str, Any]:
    from llmstack.models import register_model
    from llmstack.registry import validation_key
    from llmstack.serve._testing import make_registry, tiny_model

    info = make_registry(url, adapters=0)
    reg = info["registry"]
    ok = {"passed": True, "summary": "benchmark fixture", "failed_checks": []}
    refs = {}
    for seed, tag in ((1, "v2"), (2, "v3"), (3, "v4")):
        model, tok = tiny_model(seed=seed)
        ref = register_model(reg, "tiny-lm", model, tok, kind="model", parents=[info["model"]])
        reg.annotate(ref, validation_key(info["model"]), ok)
        refs[tag] = str(ref)
    return {"registry": reg, **refs}


def timed_load(url: str, seconds: float, threads: int) -> dict[str, float]:
    return run_for(canary_load(url, threads=threads), seconds)


def wait_state(app: str, timeout: float) -> dict[str, Any]:
    from llmstack.serve.canary import canary_status

    deadline = time.time() + timeout
    while time.time() < deadline:
        st = canary_status(app_name=app)
        if not st["running"]:
            return st
        time.sleep(0.1)
    raise RuntimeError(f"canary still running after {timeout} s: {st['canary']}")


def plot_timeline(samples: list[Any], marks: dict[str, float], path: Path) -> bool:
    try:
        plt = pyplot()
    except ImportError:
        return False
    t0 = min(s.sent for s in samples)
    width = 0.5
    bins = int((max(s.sent for s in samples) - t0) / width) + 1
    series: dict[str, list[int]] = {}
    for s in samples:
        key = s.version or "failed" if s.status == 200 else "failed"
        series.setdefault(key, [0] * bins)[int((s.sent - t0) / width)] += 1
    xs = [i * width for i in range(bins)]
    fig, ax = plt.subplots(figsize=(9, 3.5))
    bottom = [0] * bins
    for key, counts in sorted(series.items()):
        ax.bar(xs, counts, width=width, bottom=bottom, label=key, align="edge")
        bottom = [b + c for b, c in zip(bottom, counts)]
    for label, t in marks.items():
        ax.axvline(t - t0, color="k", ls="--", lw=0.8)
        ax.text(t - t0, max(bottom) * 0.95, label, rotation=90, va="top", fontsize=8)
    ax.set_xlabel("seconds")
    ax.set_ylabel("requests sent / 0.5 s")
    ax.set_title("healthy plan 5->25->50->100% then manual rollback, by answering version")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=2, help="runs per fault")
    parser.add_argument("--threads", type=int, default=4, help="closed-loop HTTP clients")
    args = parser.parse_args()
    t_begin = time.time()

    import ray
    from ray import serve

    import llmstack
    from llmstack.serve.canary import (canary_abort, canary_start, canary_status, deploy_canary, rollback_app)

    start_ray(4)
    port = start_serve()
    tmp = tempfile.mkdtemp(prefix="canary-bench-")
    info = registry_with_versions(os.path.join(tmp, "registry"))
    reg = info["registry"]
    common = {"registry": reg.url,
              "engine": {"max_batch_size": 8, "batch_wait_timeout_s": 0.005, "response_cache_size": 0,
                         "default_max_tokens": 8, "max_tokens_limit": 64},
              "deployment": {"max_ongoing_requests": 32, "max_queued_requests": -1,
                             "ray_actor_options": {"num_cpus": 0.25}}}
    log("deploying the plain app (baseline) and the canary app")
    plain = llmstack.deploy({**common, "model": V1, "app_name": "bench-plain",
                             "http": {"port": port, "route_prefix": "/plain"}})
    canary = deploy_canary({**common, "stable": "tiny-lm@production", "candidate": V2,
                            "versions": [{"name": "broken", "model": info["v3"],
                                          "deployment": FAULTY,
                                          "deployment_args": {"fault": "raise", "delay_s": 2.0}}],
                            "app_name": "bench-canary", "http": {"port": port, "route_prefix": "/canary"},
                            "thresholds": {"window_s": 30}})
    wait_healthy(plain.url)
    wait_healthy(canary.url)
    app = canary.app_name
    broken = serve.get_deployment_handle("LLMServer-broken", app_name=app)
    broken.set_fault.remote(None).result()
    timed_load(canary.url, 4, args.threads)  # warm every path (weights 100% stable: warms v1 only)
    from llmstack.serve.protocol import GenerationRequest, SamplingParams

    for name in ("LLMServer-tiny-lm-v2", "LLMServer-broken"):
        h = serve.get_deployment_handle(name, app_name=app)
        for _ in range(2):
            request = GenerationRequest(model="tiny-lm", prompt="x", sampling=SamplingParams(max_tokens=8))
            h.generate.remote(request).result()
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                           "ray": ray.__version__, "load_avg_1m_at_start": os.getloadavg()[0]},
                               "threads": args.threads}

    log("1. router overhead: plain app vs canary app (stable 100%)")
    overhead = {"plain": [], "canary": []}
    for _ in range(2):  # interleaved, so drift hits both alike
        overhead["plain"].append(timed_load(plain.url, 8, args.threads))
        overhead["canary"].append(timed_load(canary.url, 8, args.threads))
    agg = {k: {m: statistics.median(r[m] for r in v) for m in ("rps", "p50_ms", "p95_ms")}
           for k, v in overhead.items()}
    agg["p50_ratio"] = agg["canary"]["p50_ms"] / agg["plain"]["p50_ms"]
    agg["rps_ratio"] = agg["canary"]["rps"] / agg["plain"]["rps"]
    agg["p50_added_ms"] = agg["canary"]["p50_ms"] - agg["plain"]["p50_ms"]
    results["overhead"] = agg
    log(f"   {agg}")
    plain.shutdown()

    log("2. broken candidates, auto-rollback")
    faults: dict[str, list[dict[str, Any]]] = {}
    for fault in ("raise", "garbage", "slow"):
        for r in range(args.repeats):
            broken.set_fault.remote(fault).result()
            with canary_load(canary.url, threads=args.threads) as load:
                time.sleep(1.5)
                t_start = time.time()
                canary_start("broken", app_name=app, force=True,
                             plan={"steps": [25, 50, 100], "hold_s": 30, "min_requests": 5})
                st = wait_state(app, 30)
                time.sleep(1.0)
            c = st["canary"]
            samples = [s for s in load.samples if s.sent >= t_start]
            failed = [s for s in samples if s.status != 200]
            row = {"state": c["state"], "reason": c["reason"], "first_bad_to_zero_s": c["first_bad_to_zero_s"],
                   "breach_to_zero_s": c["breach_to_zero_s"], "routed_to_candidate": c["routed_to_candidate"],
                   "failed": len(failed), "failed_on_stable": sum(s.version != "broken" for s in failed),
                   "bad_outputs_returned": sum(1 for s in samples if s.version == "broken" and s.status == 200
                                               and fault == "garbage"),
                   "requests": len(samples)}
            faults.setdefault(fault, []).append(row)
            log(f"   {fault} #{r + 1}: {row}")
    broken.set_fault.remote(None).result()
    results["faults"] = faults

    log("3. healthy candidate through the plan, then 4. manual rollback, under load")
    with canary_load(canary.url, threads=args.threads) as load:
        time.sleep(1.0)
        t_plan = time.time()
        canary_start(V2, app_name=app, plan={"steps": [5, 25, 50, 100], "hold_s": 3.0, "min_requests": 3})
        st = wait_state(app, 90)
        t_promoted = time.time()
        time.sleep(2.0)
        t_rb = time.time()
        rb = rollback_app(app_name=app, reason="benchmark: manual rollback under load")
        t_rb_done = time.time()
        time.sleep(2.5)
    samples = list(load.samples)
    plan_failed = [s for s in samples if t_plan <= s.sent < t_rb and s.status != 200]
    rb_failed = [s for s in samples if s.sent >= t_rb and s.status != 200]
    last_old = max((s.sent for s in samples if s.sent >= t_rb and s.version == V2), default=t_rb)
    results["plan"] = {"state": st["canary"]["state"], "seconds_to_promotion": t_promoted - t_plan,
                       "requests": sum(1 for s in samples if t_plan <= s.sent < t_rb),
                       "failed": len(plan_failed), "routed_to_candidate": st["canary"]["routed_to_candidate"],
                       "registry_production_after": None}
    results["rollback"] = {"failed": len(rb_failed), "requests": sum(1 for s in samples if s.sent >= t_rb),
                           "call_s": t_rb_done - t_rb, "last_request_to_old_version_after_call_s": last_old - t_rb,
                           "registry_event": (rb.get("registry_event") or {}).get("action"),
                           "production_after": reg.aliases("tiny-lm").get("production")}
    log(f"   plan {results['plan']}\n   rollback {results['rollback']}")
    plotted = plot_timeline([s for s in samples if s.sent >= t_plan - 0.5],
                            {"canary start": t_plan, "promoted": t_promoted, "rollback": t_rb},
                            RESULTS / "canary_timeline.png")

    log("5. shadow mode (50% mirrored, answers discarded)")
    base = timed_load(canary.url, 6, args.threads)
    with canary_load(canary.url, threads=args.threads) as load:
        canary_start(V2, app_name=app, plan={"steps": [], "shadow_share": 0.5, "shadow_hold_s": 6,
                                             "min_requests": 1})
        time.sleep(6.0)
        st = wait_state(app, 20)
    ok = [s for s in load.samples if s.status == 200]
    c = st["canary"]
    shadow_totals = canary_status(app_name=app)["versions"][V2]["totals"]
    results["shadow"] = {"state": c["state"], "mirrored": shadow_totals.get("shadow_requests", 0),
                         "shadow_errors": shadow_totals.get("shadow_errors", 0),
                         "answers_from_candidate": sum(1 for s in ok if s.version != V1),
                         "failed": len(load.samples) - len(ok),
                         "stable_p50_ms_without": base["p50_ms"],
                         "stable_p50_ms_with": 1000 * pct([s.done - s.sent for s in ok], 50)}
    log(f"   {results['shadow']}")

    log("6. canary of a version the app does not serve yet (side application)")
    t0 = time.time()
    canary_start(info["v4"], app_name=app, plan={"steps": [5, 100], "hold_s": 60})
    results["side_app"] = {"deploy_and_start_s": time.time() - t0,
                           "versions": list(canary_status(app_name=app)["versions"])}
    canary_abort(app_name=app, reason="benchmark done")
    canary.shutdown()
    serve.shutdown()
    ray.shutdown()
    results["wall_s"] = time.time() - t_begin
    write_json("canary", results, indent=2, default=str)

    def fmean(fault: str, key: str) -> float:
        return statistics.mean(r[key] for r in faults[fault] if r[key] is not None)

    o = results["overhead"]
    lines = ["## canary", "",
             f"`python benchmarks/canary_bench.py` ({results['wall_s'] / 60:.1f} min on {os.cpu_count()} CPU cores; "
             f"Ray {ray.__version__}). Tiny random-init model, {args.threads} closed-loop HTTP clients, "
             "8 tokens per request, candidate faults injected with the test-only `fault` option of a version. "
             f"Machine load average at start: {results['machine']['load_avg_1m_at_start']:.0f} "
             "(other jobs were running: absolute latencies are noisy, the rollback figures are not).", "",
             "| router overhead (same model, same load) | plain app | canary app | ratio |", "|---|---|---|---|",
             f"| p50 latency | {o['plain']['p50_ms']:.0f} ms | {o['canary']['p50_ms']:.0f} ms | "
             f"x{o['p50_ratio']:.2f} (+{o['p50_added_ms']:.1f} ms) |",
             f"| p95 latency | {o['plain']['p95_ms']:.0f} ms | {o['canary']['p95_ms']:.0f} ms | "
             f"x{o['canary']['p95_ms'] / o['plain']['p95_ms']:.2f} |",
             f"| throughput | {o['plain']['rps']:.1f} req/s | {o['canary']['rps']:.1f} req/s | x{o['rps_ratio']:.2f} |",
             "", f"Broken candidate at 25% of traffic, rolled back automatically ({args.repeats} runs each; "
             "target: first bad response to 0% traffic <= 2 s, failed <= routed to the candidate):", "",
             "| fault | rolled back | first bad -> 0% (mean / max) | breach detected -> 0% "
             "| failed / routed to candidate | failed on stable |",
             "|---|---|---|---|---|---|"]
    for fault, rows in faults.items():
        lines.append(f"| {fault} | {sum(r['state'] == 'rolled_back' for r in rows)}/{len(rows)} | "
                     f"{fmean(fault, 'first_bad_to_zero_s'):.3f} / "
                     f"{max(r['first_bad_to_zero_s'] or 0 for r in rows):.3f} s | "
                     f"{1000 * fmean(fault, 'breach_to_zero_s'):.2f} ms | "
                     f"{sum(r['failed'] for r in rows)} / {sum(r['routed_to_candidate'] for r in rows)} | "
                     f"{sum(r['failed_on_stable'] for r in rows)} |")
    p, rb, sh = results["plan"], results["rollback"], results["shadow"]
    lines += ["", "(`garbage` answers are HTTP 200 with degenerate text: they count as bad outputs, not failures; "
              "`slow` is measured from the moment the first candidate request passed the latency limit.)", "",
              f"- Healthy candidate, plan 5 -> 25 -> 50 -> 100% (3 s holds): {p['state']} after "
              f"{p['seconds_to_promotion']:.1f} s, **{p['failed']} failed** of {p['requests']} requests "
              f"({p['routed_to_candidate']} on the candidate); the registry alias moved (Registry.promote).",
              f"- Manual rollback during load (`rollback_app`): **{rb['failed']} failed** of {rb['requests']} requests; "
              f"the call took {1000 * rb['call_s']:.0f} ms (routing switches first, then the registry write); "
              + ("no request sent after the call began reached the old version"
                 if rb['last_request_to_old_version_after_call_s'] <= 0 else
                 f"the last request reaching the old version was sent "
                 f"{rb['last_request_to_old_version_after_call_s']:.2f} s after the call began")
              + "; registry event "
              f"`{rb['registry_event']}`, production -> v{rb['production_after']}.",
              f"- Shadow mode (50% mirrored for 6 s): {sh['mirrored']} mirrored, {sh['answers_from_candidate']} "
              f"candidate answers returned, {sh['failed']} failed; stable p50 {sh['stable_p50_ms_without']:.0f} ms "
              f"without vs {sh['stable_p50_ms_with']:.0f} ms with mirroring (same CPUs serve both).",
              f"- Starting a canary of a version not yet served (side application deployed first): "
              f"{results['side_app']['deploy_and_start_s']:.1f} s.",
              ""]
    if plotted:
        lines += ["![requests by answering version](results/canary_timeline.png)", ""]
    write_section("canary", "\n".join(lines))
    log(f"done in {results['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
