"""Multi-region benchmark: failover on a killed region, re-admission, cost per policy, router overhead (issue #15).

One run on a real multi-node local Ray cluster (``ray.cluster_utils.Cluster``: a head for the routers and
one 1-CPU node per region, each holding ``region:<name>``; its own ports and RAY_TMPDIR), a tiny registered
model with one replica pinned per region, and real HTTP from local client threads. The regions differ only
in price and an added network round trip (the router waits ``latency_ms`` before dispatching, a stand-in for
distance on one machine):

    us-east $3.00/replica-hour, +0 ms;  eu-west $1.50, +30 ms;  ap-south $0.80, +700 ms;  SLO p95 <= 0.6 s

1. Cost per policy, side by side on the same cluster: ``cost`` (cheapest region meeting the SLO),
   ``round_robin``, and cheapest-only (a manual weight of 1 on ap-south): cost per 1k tokens from the
   router's cost counters (replica-seconds x price), and SLO attainment (share of requests whose
   client-measured latency met the SLO).
2. Failover: round-robin load (one client streaming); eu-west's raylet SIGKILLed (a lost zone, no graceful
   stop). Kill to the last dispatch to eu-west (latest over the router replicas), to the first sign (a
   suspect) and to ejection; requests failed as the clients saw them; answers that came after one retry.
3. Re-admission: a new eu-west node joins; Serve restarts the replica there; seconds to re-admission (two
   passing probes, first and every router replica) and to eu-west's first answer.
4. Repeated kills and restarts: each region killed in turn and brought back under the same load; per kill
   the same figures, and the availability (share answered) over the whole run.
5. Router overhead: p50 latency one request at a time through the global router vs straight to a plain
   single-region app of the same model (interleaved), beside the router's own time per request.

Writes benchmarks/results/regions.json, regions_timeline.png and the ``## regions`` section of RESULTS.md.

Reproduce: python benchmarks/regions_bench.py          (about 5 minutes on 2 CPU cores)
           python benchmarks/regions_bench.py --report-only   (the section and PNG from results/regions.json)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from harness import RESULTS_DIR as RESULTS
from harness import cpu_name, logger, markdown_table, pct, write_json, write_section
from harness.cluster import RegionCluster, get_json, post_json, replica_views, wait_for  # no Ray import yet
from harness.loadgen import CompletionLoad, CompletionSample, post_completion
from harness.plots import pyplot

REGIONS = {
    "us-east": {"price_per_replica_hour": 3.0, "latency_ms": 0},
    "eu-west": {"price_per_replica_hour": 1.5, "latency_ms": 30},
    "ap-south": {"price_per_replica_hour": 0.8, "latency_ms": 700},
}
SLO_S = 0.6
ROUTERS = 2  # router replicas (the default): each probes on its own, overrides and ejections are shared
ROUTING = {"policy": "cost", "slo_p95_s": SLO_S, "min_samples": 5, "window_s": 60, "eject_after_failures": 2,
           "readmit_after_probes": 2, "probe_interval_s": 0.25, "probe_timeout_s": 1.0, "attempt_timeout_s": 8,
           "router_replicas": ROUTERS}
CYCLE_REGIONS = ("ap-south", "us-east", "eu-west")  # one kill and restart each, one after the other
KILL_HOLD_S = 6.0  # each killed region stays down this long before a new node joins
OVERHEAD_N = 60
MAX_TOKENS = 16
POLICY_S = 20.0
THREADS = 3
BIN_S = 0.5
SAMPLE_KEYS = ("sent", "done", "status", "region", "retried", "stream", "cost")  # of each sample in regions.json
log = logger("regions")


def region_load(url: str, model: str, *, threads: int = THREADS, stream_threads: int = 0) -> CompletionLoad:
    """``threads`` closed-loop clients (the first ``stream_threads`` streaming), greedy, ``MAX_TOKENS`` each."""
    return CompletionLoad(url, threads=threads, stream_threads=stream_threads, max_tokens=MAX_TOKENS,
                          prompt=lambda worker, n: f"line {(worker * 1000 + n) % 60}:", extra={"model": model})


def sample_rows(samples: list[CompletionSample]) -> list[dict[str, Any]]:
    return [{key: getattr(s, key) for key in SAMPLE_KEYS} for s in samples]


def serve_args(registry: str, port: int) -> dict[str, Any]:
    return {"model": "tiny-lm@production", "registry": registry, "app_name": "regions-bench",
            "http": {"port": port, "host": "127.0.0.1"}, "regions": REGIONS, "routing": ROUTING,
            "engine": {"num_threads": 1, "max_batch_size": 4, "response_cache_size": 0,
                       "default_max_tokens": MAX_TOKENS, "max_tokens_limit": 64, "batch_wait_timeout_s": 0.005},
            "deployment": {"max_ongoing_requests": 8, "max_queued_requests": -1,
                           "ray_actor_options": {"num_cpus": 1.0}}}


def costs(url: str) -> dict[str, Any]:
    """The app's cost counters, summed over every router replica (each counts what it routed)."""
    from llmstack.serve.routing.cost import app_cost

    return app_cost(url)


def diff(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    cost = after["total"]["cost_usd"] - before["total"]["cost_usd"]
    tokens = after["total"]["tokens"] - before["total"]["tokens"]
    return {"cost_usd": cost, "tokens": tokens, "usd_per_1k_tokens": cost / tokens * 1000 if tokens else None,
            "tokens_per_dollar": tokens / cost if cost else None}


def policy_run(url: str, model: str, label: str, routing: dict[str, Any]) -> dict[str, Any]:
    post_json(url, "/regions/routing", routing)
    time.sleep(1)  # the other router replica adopts it (board sync every probe period)
    before = costs(url)
    with region_load(url, model) as load:
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


def views(url: str) -> dict[str, dict[str, Any]]:
    """Every router replica's /regions status (their health views are their own; the board shares news)."""
    return replica_views(url, ROUTERS, timeout=10)


def first_event(views_: dict[str, dict[str, Any]], region: str, kinds: tuple[str, ...], after: float) -> float | None:
    """Wall time of the first ``kinds`` event about ``region`` after ``after`` in any replica's view."""
    times = [e["at"] for v in views_.values() for e in v["events"]
             if e.get("region") == region and e["event"] in kinds and e["at"] >= after]
    return min(times, default=None)


def kill_figures(views_: dict[str, dict[str, Any]], region: str, t_kill: float) -> dict[str, Any]:
    """Seconds from the kill to the last dispatch there (latest over the router replicas), to the first sign
    (a suspect or ejection in any replica) and to the first ejection."""
    last = max(v["regions"][region]["last_routed_at_wall"] or 0.0 for v in views_.values())
    sign = first_event(views_, region, ("suspect", "ejected"), t_kill)
    ejected = first_event(views_, region, ("ejected",), t_kill)
    return {"region": region, "kill_at": t_kill, "kill_to_last_dispatch_s": max(0.0, last - t_kill),
            "kill_to_first_sign_s": None if sign is None else sign - t_kill,
            "kill_to_ejection_s": None if ejected is None else ejected - t_kill,
            "replicas_ejected": sum(1 for v in views_.values() if not v["regions"][region]["healthy"]),
            "failed_attempts": sum(v["regions"][region]["totals"]["failed"] for v in views_.values()),
            "moved_attempts": sum(v["regions"][region]["totals"]["moved"] for v in views_.values())}


def readmit(rc: Any, url: str, region: str) -> dict[str, Any]:
    """Add a node to ``region`` and wait until every router replica has re-admitted it."""
    t_add = time.time()
    rc.add(region)
    wait_for(lambda: all(v["regions"][region]["healthy"] for v in views(url).values()), timeout=150)
    got = views(url)
    times = [v["regions"][region]["readmitted_at_wall"] for v in got.values()]
    times = [t - t_add for t in times if t is not None and t > t_add]
    return {"add_at": t_add, "first_readmission_s": min(times, default=None),
            "all_readmitted_s": max(times) if len(times) == len(got) else None}


def sample_figures(samples: list[dict[str, Any]]) -> dict[str, Any]:
    ok = sum(1 for s in samples if s["status"] == 200)
    return {"requests": len(samples), "failed_requests": len(samples) - ok,
            # a stream cut after its output began on the killed region (the rule forbids retrying it)
            "failed_started_streams": sum(1 for s in samples if s["status"] == 599),
            "answered_after_retry": sum(1 for s in samples if s["retried"] and s["status"] == 200),
            "availability": ok / len(samples) if samples else None}


def failover(rc: Any, url: str, model: str) -> dict[str, Any]:
    post_json(url, "/regions/routing", {"policy": "round_robin", "weights": {}})
    time.sleep(2)  # every router replica adopted it
    with region_load(url, model, stream_threads=1) as load:
        time.sleep(8)
        t_kill = rc.kill("eu-west")
        log("eu-west's raylet killed")
        time.sleep(15)
        kill = kill_figures(views(url), "eu-west", t_kill)
        log(f"eu-west: {kill}")
        back = readmit(rc, url, "eu-west")
        log(f"eu-west back: {back}")
        time.sleep(8)
    final = views(url)
    samples = sample_rows(load.samples)
    first_eu = min((s["done"] for s in samples if s["region"] == "eu-west" and s["sent"] > back["add_at"]
                    and s["status"] == 200), default=None)
    overheads = [v["router_overhead_s"] for v in final.values()]
    return {**kill, **back, **sample_figures(samples), "samples": samples,
            "first_eu_west_answer_s": None if first_eu is None else first_eu - back["add_at"],
            "router_overhead_s": max(overheads, key=lambda o: o["n"]),
            "events": {k: v["events"] for k, v in final.items()}}


def cycles(rc: Any, url: str, model: str) -> dict[str, Any]:
    """Repeated kills and restarts, a different region each time, under the same round-robin load."""
    kills = []
    with region_load(url, model, stream_threads=1) as load:
        time.sleep(3)
        for region in CYCLE_REGIONS:
            t_kill = rc.kill(region)
            time.sleep(KILL_HOLD_S)
            kills.append({**kill_figures(views(url), region, t_kill), **readmit(rc, url, region)})
            log(f"cycle {region}: {kills[-1]}")
            time.sleep(3)
    samples = sample_rows(load.samples)
    return {"kills": kills, **sample_figures(samples), "samples": samples,
            "wall_s": samples[-1]["done"] - samples[0]["sent"] if samples else 0.0}


def router_vs_direct(rc: Any, url: str, model: str, registry: str) -> dict[str, Any]:
    """p50 latency, one request at a time, through the global router (weights: us-east 1, +0 ms) vs straight
    to a plain single-region app of the same model on a node of its own: requests interleaved, same client."""
    import requests

    from llmstack.config import merge_sections
    from llmstack.serve import deploy

    rc.cluster.add_node(num_cpus=2, object_store_memory=rc.object_store)  # room for its replica wherever its ingress goes
    plain = {k: v for k, v in serve_args(registry, rc.http_port).items() if k not in ("regions", "routing")}
    direct = deploy(merge_sections(plain, {"app_name": "direct", "http": {"route_prefix": "/direct"}}))
    post_json(url, "/regions/routing", {"weights": {"us-east": 1}})
    time.sleep(2)
    session = requests.Session()
    times: dict[str, list[float]] = {"router": [], "direct": []}
    for i in range(OVERHEAD_N):
        body = {"model": model, "prompt": f"line {i % 60}:", "max_tokens": MAX_TOKENS, "temperature": 0.0}
        for name, target in (("router", url), ("direct", direct.url))[:: 1 if i % 2 else -1]:
            s = post_completion(session, target, body)
            if s.status == 200:
                times[name].append(s.done - s.sent)
    direct.shutdown()
    out = {name: {"n": len(v), "p50_s": pct(v, 50), "p95_s": pct(v, 95)} for name, v in times.items()}
    out["p50_added_s"] = out["router"]["p50_s"] - out["direct"]["p50_s"]
    log(f"router vs direct: {out}")
    return out


def panel(ax: Any, samples: list[dict[str, Any]], t0: float, marks: list[tuple[float | None, str, str]],
          title: str) -> None:
    """Answers per 0.5 s bin by answering region (failed in red), retried answers marked, event lines."""
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
    bottom = [0.0] * bins
    colors = {"us-east": "tab:blue", "eu-west": "tab:orange", "ap-south": "tab:green", "failed": "tab:red"}
    for name, ys in series.items():
        ax.bar(xs, ys, width=BIN_S, align="edge", bottom=bottom, color=colors[name], label=name)
        bottom = [b + y for b, y in zip(bottom, ys)]
    points = [(x + BIN_S / 2, y) for x, y in zip(xs, retried) if y > 0]
    if points:
        ax.plot([x for x, _ in points], [y for _, y in points], "kv", ms=5, label="answered after a retry")
    top = max(bottom) or 1.0
    for n, (value, text, style) in enumerate(marks):
        if value is not None and value == value:
            ax.axvline(value, color="k" if style == "--" else "grey", ls=style, lw=1)
            ax.text(value + 0.2, top * (0.95 - 0.12 * (n % 3)), text, fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.set_ylabel("answers/s")


def plot(fo: dict[str, Any], cy: dict[str, Any], path: Path) -> bool:
    try:
        plt = pyplot()
    except ImportError:
        return False
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 6.4))
    t0 = fo["kill_at"]
    panel(top, fo["samples"], t0, [
        (0.0, "eu-west raylet SIGKILL", "--"), (fo["kill_to_last_dispatch_s"], "last dispatch", ":"),
        (fo["kill_to_ejection_s"], "ejected", ":"), (fo["add_at"] - t0, "new node", "--"),
        (None if fo["first_readmission_s"] is None else fo["add_at"] - t0 + fo["first_readmission_s"],
         "re-admitted", ":")], "one region killed and brought back (seconds from the kill)")
    c0 = cy["samples"][0]["sent"] if cy["samples"] else 0.0
    marks: list[tuple[float | None, str, str]] = []
    for k in cy["kills"]:
        marks += [(k["kill_at"] - c0, f"{k['region']} killed", "--"), (k["add_at"] - c0, "new node", ":")]
    panel(bottom, cy["samples"], c0, marks, "repeated kills and restarts (seconds from the start of the run)")
    bottom.set_xlabel("answers per 0.5 s bin, by answering region")
    top.legend(fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.12), ncol=6, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def report(r: dict[str, Any], plotted: bool) -> str:
    fo, cy, oh, m = r["failover"], r["cycles"], r["overhead"], r["machine"]
    regions = "; ".join(f"{n} ${v['price_per_replica_hour']:.2f}/replica-hour, +{v['latency_ms']} ms"
                        for n, v in REGIONS.items())
    lines = ["## regions", "",
             f"`python benchmarks/regions_bench.py` ({r['wall_s'] / 60:.1f} min on {m['cpus']} CPU cores shared with "
             f"other work, {m['cpu']}; Ray {m['ray']}; load average {m['load_avg_1m_at_start']:.1f} at start, "
             f"{m['load_avg_1m_at_end']:.1f} at the end). A real multi-node local Ray cluster (head for the "
             f"{ROUTERS} router replicas, Serve controller and proxy + one 1-CPU node per region, marked "
             "`region:<name>`), one tiny-model replica pinned per region, "
             f"{THREADS} closed-loop HTTP clients, greedy completions of {MAX_TOKENS} tokens. Regions: {regions}; "
             "the offset is added by the router before dispatch (a stand-in for distance on one machine). "
             f"SLO: p95 <= {SLO_S} s. Probes every {ROUTING['probe_interval_s']} s, {ROUTING['probe_timeout_s']} s "
             "timeout; a region is routed around at its first sign (a probe unanswered at half the timeout, a "
             "failed probe or attempt) and ejected at the second failure (at once on a dead actor's error). "
             "Costs are the router's counters: each answer's replica-seconds (its time on the replica divided by "
             "its batch size, measured in the engine) x the region's price.", "",
             f"**Cost per policy** ({POLICY_S:.0f} s of load each, one after the other on the same cluster)", ""]
    lines += markdown_table(
        ["policy", "requests", "failed", "answered by", "$ per 1k tokens", "tokens per $", "SLO attainment",
         "p50 / p95 latency (ms)"],
        [[row["label"], row["requests"], row["failed"],
          ", ".join(f"{k} {v}" for k, v in sorted(row["by_region"].items())), f"{row['usd_per_1k_tokens']:.6f}",
          f"{row['tokens_per_dollar']:,.0f}", f"{row['slo_attainment']:.1%}",
          f"{row['p50_s'] * 1000:.0f} / {row['p95_s'] * 1000:.0f}"] for row in r["policies"].values()],
        align="lrrlrrrl")
    p = r["policies"]
    lines += ["", f"cost policy vs round_robin: **{p['cost']['usd_per_1k_tokens'] / p['round_robin']['usd_per_1k_tokens']:.2f}x** "
              f"the cost per 1k tokens at {p['cost']['slo_attainment']:.0%} vs {p['round_robin']['slo_attainment']:.0%} "
              f"SLO attainment; cheapest-only is {p['cheapest']['usd_per_1k_tokens'] / p['cost']['usd_per_1k_tokens']:.2f}x "
              f"the cost policy's cost at {p['cheapest']['slo_attainment']:.0%} SLO attainment.", "",
              "**Failover and re-admission** (round-robin load over the 3 regions, one client streaming; eu-west's "
              "raylet SIGKILLed (then its node's other processes), 15 s later a new eu-west node joins)", "",
              "| figure | value |", "|---|---|",
              f"| kill to the last dispatch to eu-west (latest of the {ROUTERS} router replicas) | "
              f"**{fo['kill_to_last_dispatch_s']:.2f} s** |",
              f"| kill to the first sign (a slow or failed probe: eu-west routed around) | "
              f"{_s(fo['kill_to_first_sign_s'], 2)} |",
              f"| kill to eu-west ejected (first replica; the other by the board or its own probes) | "
              f"{_s(fo['kill_to_ejection_s'], 2)} |",
              f"| requests failed (as clients saw them) | {fo['failed_requests']} of {fo['requests']} "
              f"({fo['failed_started_streams']} of them streams cut after their output began on eu-west: never "
              "retried, by the rule) |",
              f"| requests answered by another region after one retry | {fo['answered_after_retry']} (routers: "
              f"{fo['failed_attempts']} attempts failed on eu-west, {fo['moved_attempts']} waiting on it moved "
              "when it was ejected) |",
              f"| new node to eu-west re-admitted (first / all router replicas) | {_s(fo['first_readmission_s'])} / "
              f"{_s(fo['all_readmitted_s'])} |",
              f"| new node to eu-west's first answer | {_s(fo['first_eu_west_answer_s'])} |", "",
              f"**Repeated kills and restarts** ({len(cy['kills'])} cycles in {cy['wall_s']:.0f} s, same load: each "
              f"region's raylet SIGKILLed in turn, a new node {KILL_HOLD_S:.0f} s later, the next kill once every "
              "router replica re-admitted it)", "",
              "| region killed | kill to last dispatch | kill to first sign | kill to ejection | failed / moved "
              "attempts | new node to re-admitted (all replicas) |", "|---|---:|---:|---:|---:|---:|"]
    for k in cy["kills"]:
        lines.append(f"| {k['region']} | {k['kill_to_last_dispatch_s']:.2f} s | {_s(k['kill_to_first_sign_s'], 2)} | "
                     f"{_s(k['kill_to_ejection_s'], 2)} | {k['failed_attempts']} / {k['moved_attempts']} | "
                     f"{_s(k['all_readmitted_s'])} |")
    worst = max([fo["kill_to_last_dispatch_s"], *(k["kill_to_last_dispatch_s"] for k in cy["kills"])])
    lines += ["", f"Availability over the repeated kills: **{cy['availability']:.2%}** ({cy['failed_requests']} of "
              f"{cy['requests']} failed, {cy['failed_started_streams']} of them streams cut after their output began: "
              "the rule forbids retrying those, so each kill can cost one in-flight stream per streaming client "
              f"whatever the router does; {cy['answered_after_retry']} answered after one retry). Worst kill to last dispatch over the "
              f"{1 + len(cy['kills'])} kills: **{worst:.2f} s** (target <= 2 s"
              + (")." if worst <= 2.0 else f": missed by {worst - 2.0:.2f} s).") + "", "",
              f"**Router overhead** ({oh['router']['n']} + {oh['direct']['n']} requests one at a time, interleaved, "
              "same client): through the global router (weights us-east 1, +0 ms) vs straight to a plain "
              "single-region app of the same model (its own ingress and replica on a node of its own)", "",
              "| path | p50 (ms) | p95 (ms) |", "|---|---:|---:|",
              f"| global router -> us-east | {oh['router']['p50_s'] * 1000:.1f} | {oh['router']['p95_s'] * 1000:.1f} |",
              f"| straight to a region's app | {oh['direct']['p50_s'] * 1000:.1f} | {oh['direct']['p95_s'] * 1000:.1f} |",
              "", f"The router adds **{oh['p50_added_s'] * 1000:+.1f} ms** at p50 "
              f"({oh['router']['p50_s'] / oh['direct']['p50_s']:.2f}x); its own time per request (outside the backend "
              f"call and the offset, {fo['router_overhead_s']['n']} requests) is "
              f"{fo['router_overhead_s']['p50'] * 1e6:.0f} / {fo['router_overhead_s']['p95'] * 1e6:.0f} us p50 / p95: "
              "the rest of the difference is the extra handle hop and its noise on a loaded machine.", ""]
    lines += [f"- Deploy: cluster up in {r['cluster_start_s']:.0f} s, app healthy {r['deploy_s']:.0f} s later.",
              "- Kill to no traffic is bounded by the first sign in every router replica: probe period + half the "
              f"probe timeout ({ROUTING['probe_interval_s'] + ROUTING['probe_timeout_s'] / 2:.2f} s here) plus however "
              "late a starved router process gets to it; a suspect region gets no new request while a trusted one "
              "has room. Attempts waiting on the dead node (dispatched before that) move to another region at the "
              "ejection (second failed probe), each retried once; a stream whose output had "
              "begun there fails when Ray declares the node dead (health check 1 s x 3 on this test cluster).",
              "- On this loaded machine a healthy region's probe sometimes takes more than half the timeout (most "
              "often while a new node starts and loads the model): that region is routed around until its next "
              "passing probe, a period later; it costs no request.",
              "- Re-admission includes Serve placing and starting the replacement replica on the new node "
              "(model load) and then two passing probes in each router replica.", ""]
    if plotted:
        lines.append("![answers per second by region around the kills and re-admissions](results/regions_timeline.png)")
    return "\n".join(lines)


def _s(value: float | None, digits: int = 1) -> str:
    return "never" if value is None else f"{value:.{digits}f} s"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--report-only", action="store_true",
                        help="re-render the section and the PNG from the last run's regions.json")
    if parser.parse_args().report_only:
        results = json.loads((RESULTS / "regions.json").read_text())
        write_section("regions", report(results, plot(results["failover"], results["cycles"],
                                                     RESULTS / "regions_timeline.png")))
        return 0
    if "RAY_TMPDIR" not in os.environ:  # before Ray is imported: nothing lands in other clusters' /tmp/ray
        os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="lsrb-")
    from llmstack.serve._testing import make_registry
    from llmstack.serve.regions import deploy_regions

    start = time.time()
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
            results["cycles"] = cycles(rc, url, model)
            results["overhead"] = router_vs_direct(rc, url, model, registry)
            dep.shutdown()
        finally:
            rc.shutdown()
    results["wall_s"] = time.time() - start
    results["machine"]["load_avg_1m_at_end"] = os.getloadavg()[0]
    write_json(RESULTS / "regions.json", results, default=str)
    plotted = plot(results["failover"], results["cycles"], RESULTS / "regions_timeline.png")
    write_section("regions", report(results, plotted))
    log(f"done in {results['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
