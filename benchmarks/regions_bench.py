"""Multi-region benchmark: failover on a killed region, re-admission, cost per policy, router overhead (issue #15).

One run on a real multi-node local Ray cluster (``ray.cluster_utils.Cluster``: a head for the router and
one 1-CPU node per region, each holding ``region:<name>``; its own ports and RAY_TMPDIR), a tiny registered
model with one replica pinned per region, and real HTTP from local client threads. The regions differ only
in price and an added network round trip (the router waits ``latency_ms`` before dispatching, a stand-in for
distance on one machine):

    us-east $3.00/replica-hour, +0 ms;  eu-west $1.50, +30 ms;  ap-south $0.80, +700 ms;  SLO p95 <= 0.6 s

1. Cost per policy, side by side on the same cluster: ``cost`` (cheapest region meeting the SLO),
   ``round_robin``, and cheapest-only (a manual weight of 1 on ap-south): cost per 1k tokens from the
   router's cost counters (replica-seconds x price), and SLO attainment (share of requests whose
   client-measured latency met the SLO).
2. Failover: round-robin load (one client streaming); eu-west's node removed without a graceful shutdown.
   Kill to the router's last dispatch to eu-west, kill to ejection, requests failed as the clients saw them,
   attempts that failed and were retried on another region, availability.
3. Re-admission: a new eu-west node joins; Serve restarts the replica there; seconds to re-admission (two
   passing probes) and to eu-west's first answer.
4. Router overhead: the router's own time per request (outside the backend call and the network offset), p50.

Writes benchmarks/results/regions.json, regions_timeline.png and the ``## regions`` section of RESULTS.md.

Reproduce: python benchmarks/regions_bench.py          (about 4 minutes on 2 CPU cores)
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from _common import cpu_name, pct, write_section

HERE = Path(__file__).parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE.parent / "tests" / "integration" / "regions"))  # the cluster and load helpers

REGIONS = {
    "us-east": {"price_per_replica_hour": 3.0, "latency_ms": 0},
    "eu-west": {"price_per_replica_hour": 1.5, "latency_ms": 30},
    "ap-south": {"price_per_replica_hour": 0.8, "latency_ms": 700},
}
SLO_S = 0.6
ROUTING = {"policy": "cost", "slo_p95_s": SLO_S, "min_samples": 5, "window_s": 60, "eject_after_failures": 2,
           "readmit_after_probes": 2, "probe_interval_s": 0.5, "probe_timeout_s": 1.5, "attempt_timeout_s": 8}
MAX_TOKENS = 16
POLICY_S = 20.0
THREADS = 3
BIN_S = 0.5


def serve_args(registry: str, port: int) -> dict[str, Any]:
    return {"model": "tiny-lm@production", "registry": registry, "app_name": "regions-bench", "port": port,
            "host": "127.0.0.1", "regions": REGIONS, "routing": ROUTING, "num_cpus": 1.0, "num_threads": 1,
            "max_batch_size": 4, "max_ongoing_requests": 8, "max_queued_requests": -1, "response_cache_size": 0,
            "default_max_tokens": MAX_TOKENS, "max_tokens_limit": 64, "batch_wait_timeout_s": 0.005}


def costs(url: str) -> dict[str, Any]:
    import requests

    from llmstack.serve.regions import cost_report

    return cost_report(requests.get(url + "/metrics", timeout=10).text)


def diff(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    cost = after["total"]["cost_usd"] - before["total"]["cost_usd"]
    tokens = after["total"]["tokens"] - before["total"]["tokens"]
    return {"cost_usd": cost, "tokens": tokens, "usd_per_1k_tokens": cost / tokens * 1000 if tokens else None,
            "tokens_per_dollar": tokens / cost if cost else None}


def policy_run(url: str, model: str, label: str, routing: dict[str, Any]) -> dict[str, Any]:
    from region_cluster import Load, log, post_json

    post_json(url, "/regions/routing", routing)
    before = costs(url)
    with Load(url, model, threads=THREADS, max_tokens=MAX_TOKENS) as load:
        time.sleep(POLICY_S)
    after = costs(url)
    samples = load.samples
    ok = [s for s in samples if s.status == 200]
    latencies = [s.done - s.sent for s in ok]
    row = {"label": label, "routing": routing, "requests": len(samples), "failed": len(samples) - len(ok),
           "by_region": dict(Counter(s.region for s in ok)),
           "slo_attainment": sum(1 for x in latencies if x <= SLO_S) / len(latencies) if latencies else None,
           "p50_s": pct(latencies, 50), "p95_s": pct(latencies, 95), **diff(after, before)}
    log(f"{label}: {row['requests']} requests, {row['usd_per_1k_tokens']:.6f} $/1k tokens, "
        f"SLO attainment {row['slo_attainment']:.0%}, by region {row['by_region']}")
    return row


def failover(rc: Any, url: str, model: str) -> dict[str, Any]:
    from region_cluster import Load, get_json, log, post_json, wait_for

    post_json(url, "/regions/routing", {"policy": "round_robin", "weights": {}})
    with Load(url, model, threads=THREADS, stream_threads=1, max_tokens=MAX_TOKENS) as load:
        time.sleep(8)
        t_kill = rc.kill("eu-west")
        log("eu-west's node removed")
        time.sleep(15)
        after_kill = get_json(url, "/regions")
        t_add = time.time()
        rc.add("eu-west")
        log("a new eu-west node joined")
        wait_for(lambda: get_json(url, "/regions")["regions"]["eu-west"]["healthy"], timeout=150)
        time.sleep(8)
    final = get_json(url, "/regions")
    samples = [s.__dict__ for s in load.samples]
    eu_kill, eu_final = after_kill["regions"]["eu-west"], final["regions"]["eu-west"]
    readmitted = eu_final["readmitted_at_wall"]
    first_eu = min((s["done"] for s in samples if s["region"] == "eu-west" and s["sent"] > t_add
                    and s["status"] == 200), default=None)
    fault = [s for s in samples if t_kill <= s["sent"] <= (readmitted or time.time())]
    return {
        "kill_at": t_kill, "add_at": t_add, "samples": samples,
        "kill_to_last_dispatch_s": eu_kill["last_routed_at_wall"] - t_kill,
        "kill_to_ejection_s": (eu_kill["ejected_at_wall"] or float("nan")) - t_kill,
        "failed_requests": sum(1 for s in samples if s["status"] != 200),
        # a stream cut after its output began on the killed region (the rule forbids retrying it)
        "failed_started_streams": sum(1 for s in samples if s["status"] == 599),
        "failed_attempts_retried": sum(1 for s in samples if s["retried"]),
        "eu_west_failed_attempts": eu_kill["totals"]["failed"], "eu_west_moved_attempts": eu_kill["totals"]["moved"],
        "requests": len(samples), "requests_during_fault": len(fault),
        "availability": sum(1 for s in samples if s["status"] == 200) / len(samples) if samples else None,
        "readmission_s": None if readmitted is None else readmitted - t_add,
        "first_eu_west_answer_s": None if first_eu is None else first_eu - t_add,
        "router_overhead_s": final["router_overhead_s"], "events": final["events"],
    }


def plot(fo: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    samples, t0 = fo["samples"], fo["kill_at"]
    lo = min(s["done"] for s in samples) - t0
    hi = max(s["done"] for s in samples) - t0
    bins = int((hi - lo) / BIN_S) + 1
    xs = [lo + i * BIN_S for i in range(bins)]
    series = {name: [0.0] * bins for name in (*REGIONS, "failed")}
    retried = [0.0] * bins
    for s in samples:
        i = int((s["done"] - t0 - lo) / BIN_S)
        key = s["region"] if s["status"] == 200 and s["region"] in REGIONS else "failed"
        series[key][i] += 1 / BIN_S
        if s["retried"]:
            retried[i] += 1 / BIN_S
    fig, ax = plt.subplots(figsize=(10, 3.4))
    bottom = [0.0] * bins
    colors = {"us-east": "tab:blue", "eu-west": "tab:orange", "ap-south": "tab:green", "failed": "tab:red"}
    for name, ys in series.items():
        ax.bar(xs, ys, width=BIN_S, align="edge", bottom=bottom, color=colors[name], label=name)
        bottom = [b + y for b, y in zip(bottom, ys)]
    points = [(x + BIN_S / 2, y) for x, y in zip(xs, retried) if y > 0]
    if points:
        ax.plot([x for x, _ in points], [y for _, y in points], "kv", ms=6, label="answered after a retry")
    ax.axvline(0, color="k", ls="--", lw=1)
    ax.text(0.2, max(bottom) * 0.95, "eu-west node killed", fontsize=8)
    for value, text, style in ((fo["kill_to_ejection_s"], "ejected", ":"),
                               (fo["add_at"] - t0, "new node", "--"),
                               (None if fo["readmission_s"] is None else fo["add_at"] - t0 + fo["readmission_s"],
                                "re-admitted", ":")):
        if value is not None and value == value:
            ax.axvline(value, color="grey", ls=style, lw=1)
            ax.text(value + 0.2, max(bottom) * 0.8, text, fontsize=8)
    ax.set_xlabel("seconds from the kill (answers per 0.5 s bin, by answering region)")
    ax.set_ylabel("answers/s")
    ax.legend(fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=6, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def report(r: dict[str, Any], plotted: bool) -> str:
    fo, m = r["failover"], r["machine"]
    regions = "; ".join(f"{n} ${v['price_per_replica_hour']:.2f}/replica-hour, +{v['latency_ms']} ms"
                        for n, v in REGIONS.items())
    lines = ["## regions", "",
             f"`python benchmarks/regions_bench.py` ({r['wall_s'] / 60:.1f} min on {m['cpus']} CPU cores, {m['cpu']}; "
             f"Ray {m['ray']}; load average {m['load_avg_1m_at_start']:.1f} at start). A real multi-node local Ray "
             "cluster (head for the router + one 1-CPU node per region, marked `region:<name>`), one tiny-model "
             f"replica pinned per region, {THREADS} closed-loop HTTP clients, greedy completions of {MAX_TOKENS} "
             f"tokens. Regions: {regions}; the offset is added by the router before dispatch (a stand-in for "
             f"distance on one machine). SLO: p95 <= {SLO_S} s. Costs are the router's counters: each answer's "
             "replica-seconds (its time on the replica divided by its batch size, measured in the engine) x the "
             "region's price.", "",
             f"**Cost per policy** ({POLICY_S:.0f} s of load each, one after the other on the same cluster)", "",
             "| policy | requests | failed | answered by | $ per 1k tokens | tokens per $ | SLO attainment | "
             "p50 / p95 latency (ms) |", "|---|---:|---:|---|---:|---:|---:|---|"]
    for row in r["policies"].values():
        by = ", ".join(f"{k} {v}" for k, v in sorted(row["by_region"].items()))
        lines.append(f"| {row['label']} | {row['requests']} | {row['failed']} | {by} | "
                     f"{row['usd_per_1k_tokens']:.6f} | {row['tokens_per_dollar']:,.0f} | "
                     f"{row['slo_attainment']:.1%} | {row['p50_s'] * 1000:.0f} / {row['p95_s'] * 1000:.0f} |")
    p = r["policies"]
    lines += ["", f"cost policy vs round_robin: **{p['cost']['usd_per_1k_tokens'] / p['round_robin']['usd_per_1k_tokens']:.2f}x** "
              f"the cost per 1k tokens at {p['cost']['slo_attainment']:.0%} vs {p['round_robin']['slo_attainment']:.0%} "
              f"SLO attainment; cheapest-only is {p['cheapest']['usd_per_1k_tokens'] / p['cost']['usd_per_1k_tokens']:.2f}x "
              f"the cost policy's cost at {p['cheapest']['slo_attainment']:.0%} SLO attainment.", "",
              "**Failover and re-admission** (round-robin load over the 3 regions, one client streaming; eu-west's "
              "node removed with `Cluster.remove_node(allow_graceful=False)`, 15 s later a new eu-west node joins)", "",
              "| figure | value |", "|---|---|",
              f"| kill to the router's last dispatch to eu-west | {fo['kill_to_last_dispatch_s']:.2f} s |",
              f"| kill to eu-west ejected | {fo['kill_to_ejection_s']:.2f} s |",
              f"| requests failed (as clients saw them) | {fo['failed_requests']} of {fo['requests']} "
              f"({fo['failed_started_streams']} of them streams cut after their output began on eu-west: never "
              "retried, by the rule) |",
              f"| requests answered by another region after one retry | {fo['failed_attempts_retried']} (router: "
              f"{fo['eu_west_failed_attempts']} attempts failed on eu-west, {fo['eu_west_moved_attempts']} waiting on it "
              "moved when it was ejected) |",
              f"| availability over the whole run | {fo['availability']:.2%} |",
              f"| new node to eu-west re-admitted | {_s(fo['readmission_s'])} |",
              f"| new node to eu-west's first answer | {_s(fo['first_eu_west_answer_s'])} |",
              f"| router overhead p50 / p95 (router time outside the backend call and the offset, "
              f"{fo['router_overhead_s']['n']} requests) | {fo['router_overhead_s']['p50'] * 1e6:.0f} / "
              f"{fo['router_overhead_s']['p95'] * 1e6:.0f} us |", ""]
    lines += [f"- Deploy: cluster up in {r['cluster_start_s']:.0f} s, app healthy {r['deploy_s']:.0f} s later.",
              "- Kill to no traffic is bounded by the first failed attempt (a dead actor ejects the region at once) "
              "or two failed probes (0.5 s period, 1.5 s timeout); in-flight attempts on the dead node fail "
              "when Ray declares the node dead (health check 1 s x 3 on this test cluster).",
              "- Re-admission includes Serve placing and starting the replacement replica on the new node "
              "(model load) and then two passing probes.", ""]
    if plotted:
        lines.append("![answers per second by region around the kill and the re-admission](results/regions_timeline.png)")
    return "\n".join(lines)


def _s(value: float | None) -> str:
    return "never" if value is None else f"{value:.1f} s"


def main() -> int:
    if "RAY_TMPDIR" not in os.environ:  # before Ray is imported: nothing lands in other clusters' /tmp/ray
        os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="lsrb-")
    from region_cluster import RegionCluster, get_json, log

    from llmstack.serve._testing import make_registry
    from llmstack.serve.regions import deploy_regions

    start = time.time()
    RESULTS.mkdir(exist_ok=True)
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "cpu": cpu_name(), "python": platform.python_version(),
                                           "load_avg_1m_at_start": os.getloadavg()[0]}}
    with tempfile.TemporaryDirectory(prefix="llmstack-regions-bench-") as tmp:
        registry = str(Path(tmp) / "registry")
        make_registry(registry, adapters=0)
        rc = RegionCluster(list(REGIONS), temp_dir=os.environ["RAY_TMPDIR"]).start()
        try:
            import ray

            results["machine"]["ray"] = ray.__version__
            results["cluster_start_s"] = time.time() - start
            t = time.time()
            dep = deploy_regions(serve_args(registry, rc.http_port))
            results["deploy_s"] = time.time() - t
            url = dep.url
            model = get_json(url, "/v1/models")["data"][0]["id"]
            log(f"deployed at {url}")
            results["policies"] = {
                "cost": policy_run(url, model, "cost (cheapest meeting the SLO)", {"policy": "cost"}),
                "round_robin": policy_run(url, model, "round_robin", {"policy": "round_robin"}),
                "cheapest": policy_run(url, model, "cheapest-only (weights: ap-south 1)",
                                       {"weights": {"ap-south": 1}}),
            }
            results["failover"] = failover(rc, url, model)
            dep.shutdown()
        finally:
            rc.shutdown()
    results["wall_s"] = time.time() - start
    (RESULTS / "regions.json").write_text(json.dumps(results, indent=1, default=str))
    plotted = plot(results["failover"], RESULTS / "regions_timeline.png")
    write_section("regions", report(results, plotted))
    log(f"done in {results['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
