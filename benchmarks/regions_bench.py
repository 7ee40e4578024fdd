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
2. Failover: round-robin load of streaming clients (greedy, 64 tokens each, so kills land mid-stream; each
   answer checked token for token against the one recorded before any fault); eu-west's raylet SIGKILLed (a
   lost zone, no graceful stop). Kill to the last dispatch to eu-west (latest over the router replicas), to
   the first sign (a suspect) and to ejection; streams failed as the clients saw them; answers that came
   after one retry; streams resumed on another region (as clients saw them, and as the routers counted them).
3. Re-admission: a new eu-west node joins; Serve restarts the replica there; seconds to re-admission (two
   passing probes, first and every router replica) and to eu-west's first answer.
4. Repeated kills and restarts: each region killed in turn (twice round) and brought back under the same
   streaming load; per kill the same figures; over the whole run the availability (share of streams answered
   in full), identity to the references, resumed streams and a resume's extra latency (p50/p95 of resumed vs
   unresumed streams).
5. Router overhead: p50 latency one request at a time through the global router vs straight to a plain
   single-region app of the same model (interleaved), beside the router's own time per request.

Writes benchmarks/results/regions.json, regions_timeline.png and the ``## regions`` section of RESULTS.md.

Reproduce: flock /tmp/llmstack-ray.lock timeout 900 python benchmarks/regions_bench.py   (about 6 min, 2 cores)
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import RESULTS_DIR as RESULTS
from harness import cpu_name, logger, markdown_table, pct, write_json, write_section
from harness.cluster import RegionCluster, get_json, post_json, replica_views, wait_for  # no Ray import yet
from harness.loadgen import ClosedLoop, CompletionLoad, post_completion
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
CYCLE_REGIONS = ("ap-south", "us-east", "eu-west") * 2  # one kill and restart each, one after the other, twice
KILL_HOLD_S = 6.0  # each killed region stays down this long before a new node joins
OVERHEAD_N = 60
MAX_TOKENS = 16
POLICY_S = 20.0
THREADS = 3
BIN_S = 2.0  # seconds per bar of the timeline (streams last 1-4 s)
# The failover and repeated-kill parts: every client streams greedy completions of exactly STREAM_TOKENS tokens
# (ignore_eos), long enough that a kill lands mid-stream, over STREAM_PROMPTS prompts whose answers are recorded
# one at a time before any fault.
STREAM_THREADS = 6
STREAM_TOKENS = 64
STREAM_PROMPTS = 30
log = logger("regions")


def region_load(url: str, model: str, *, threads: int = THREADS) -> CompletionLoad:
    """``threads`` closed-loop clients, not streaming, greedy, ``MAX_TOKENS`` each (the cost-per-policy load)."""
    return CompletionLoad(url, threads=threads, max_tokens=MAX_TOKENS,
                          prompt=lambda worker, n: f"line {(worker * 1000 + n) % 60}:", extra={"model": model})


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


@dataclass
class StreamSample:
    """One streamed completion as its client saw it: each text event's arrival (wall time), the text, how it
    ended (status 200 only with every event and ``[DONE]``; 599 an error event or a cut; 0 no response)."""

    prompt: str
    sent: float
    done: float = 0.0
    status: int = 0
    region: str | None = None  # the router's headers, sent with the first event
    retried: bool = False
    text: str = ""
    token_at: list[float] = field(default_factory=list)
    error: str | None = None  # "code: message" of an error event or a failed response

    @property
    def longest_gap_s(self) -> float:
        """The longest wait the client saw between its request or one text event and the next."""
        marks = [self.sent, *self.token_at]
        return max((b - a for a, b in zip(marks, marks[1:])), default=0.0)


def stream_completion(session: Any, url: str, body: dict[str, Any], *, timeout: float = 60) -> StreamSample:
    import requests

    from llmstack.serve.loadgen import DONE, REGION_HEADER, RETRIED_HEADER, sse_events

    sample = StreamSample(body["prompt"], time.time())
    parts: list[str] = []
    try:
        with session.post(url + "/v1/completions", json=body, timeout=timeout, stream=True) as r:
            sample.status = r.status_code
            sample.region, sample.retried = r.headers.get(REGION_HEADER), r.headers.get(RETRIED_HEADER) == "1"
            if r.status_code != 200:
                error = (r.json() if r.headers.get("content-type", "").startswith("application/json") else {})
                sample.error = f"{(error.get('error') or {}).get('code')}: {r.text[:200]}"
            else:
                finished = False
                for event in sse_events(r):
                    if event is DONE:
                        finished = True
                    elif "error" in event:
                        sample.status = 599
                        sample.error = f"{event['error'].get('code')}: {event['error'].get('message')}"
                    elif event.get("choices") and event["choices"][0].get("text"):
                        sample.token_at.append(time.time())
                        parts.append(event["choices"][0]["text"])
                if not finished:
                    sample.status = 599
                    sample.error = sample.error or "cut: the stream ended without [DONE]"
    except requests.RequestException as exc:
        sample.status = 599 if sample.status == 200 else 0
        sample.error = f"{type(exc).__name__}: {str(exc)[:200]}"
    sample.text, sample.done = "".join(parts), time.time()
    return sample


def stream_body(model: str, prompt: str) -> dict[str, Any]:
    return {"model": model, "prompt": prompt, "max_tokens": STREAM_TOKENS, "temperature": 0.0, "stream": True,
            "ignore_eos": True}


def stream_prompt(worker: int, n: int) -> str:
    return f"line {(worker * 7 + n) % STREAM_PROMPTS}:"


@dataclass
class StreamLoad(ClosedLoop):
    """``threads`` closed-loop clients, each streaming one greedy completion after another."""

    url: str
    model: str
    threads: int = STREAM_THREADS
    pause_s: float = 0.0
    requests_each: int | None = None
    samples: list[StreamSample] = field(default_factory=list)

    def next_sample(self, session: Any, worker: int, n: int) -> StreamSample:
        sample = stream_completion(session, self.url, stream_body(self.model, stream_prompt(worker, n)))
        if sample.status in (0, 599):
            session.close()  # drop the pooled connection that failed; the session opens a new one
        return sample


def references(url: str, model: str) -> dict[str, str]:
    """Each stream prompt's answer, one request at a time, before any fault: what every later stream must equal."""
    import requests

    session = requests.Session()
    out: dict[str, str] = {}
    for i in range(STREAM_PROMPTS):
        prompt = f"line {i}:"
        sample = stream_completion(session, url, stream_body(model, prompt))
        if sample.status != 200:
            raise RuntimeError(f"the reference answer of {prompt!r} failed before any fault: {sample.error}")
        out[prompt] = sample.text
    return out


def router_counters(url: str) -> dict[str, float]:
    """Resumed streams as the routers counted them: the region router's own counter (summed over its replicas,
    each counts what it routed) and the ingress's ``llmstack_resumed_requests`` (the cluster's total)."""
    import urllib.request

    from llmstack.serve.routing.cost import every_replica, parse_prometheus

    def fetch() -> str:
        with urllib.request.urlopen(url + "/metrics", timeout=30) as response:  # noqa: S310 - our own app
            return response.read().decode("utf-8", "replace")

    region, ingress = 0.0, []
    try:
        texts = every_replica(fetch)
    except OSError as exc:  # a figure lost, not the run
        log(f"cannot read /metrics: {exc}")
        return {"region_router": float("nan"), "ingress": float("nan")}
    for text in texts:
        region += sum(v for name, _, v in parse_prometheus(text) if name == "llmstack_region_resumed_streams_total")
        ingress.append(sum(v for name, _, v in parse_prometheus(text) if name == "llmstack_resumed_requests_total"))
    return {"region_router": region, "ingress": max(ingress, default=0.0)}


def stream_rows(samples: list[StreamSample], refs: dict[str, str],
                kills: list[tuple[str, float]]) -> list[dict[str, Any]]:
    """Each stream as regions.json keeps it, judged: answered in full, token-identical to its reference, and
    resumed as its client saw it (its output began on a region before that region's kill and was not over)."""
    rows = []
    for s in samples:
        hit = next((k for k in kills if s.region == k[0] and s.token_at and s.token_at[0] < k[1] < s.done), None)
        rows.append({"sent": s.sent, "done": s.done, "status": s.status, "region": s.region, "retried": s.retried,
                     "stream": True, "prompt": s.prompt, "tokens": len(s.token_at), "error": s.error,
                     "identical": s.status == 200 and s.text == refs.get(s.prompt),
                     "in_flight_at_kill": hit is not None, "kill_at": None if hit is None else hit[1],
                     "resumed": s.status == 200 and hit is not None, "latency_s": s.done - s.sent,
                     "longest_gap_s": s.longest_gap_s})
    return rows


def stream_figures(rows: list[dict[str, Any]], counted: dict[str, float]) -> dict[str, Any]:
    """Availability (answered in full), identity to the references, resumed streams and a resume's extra latency."""
    ok = [r for r in rows if r["status"] == 200]
    resumed = [r for r in ok if r["resumed"]]
    plain = [r for r in ok if not r["resumed"] and not r["retried"]]

    def spread(values: list[float]) -> dict[str, Any]:
        return {"n": len(values), "p50_s": pct(values, 50) if values else None,
                "p95_s": pct(values, 95) if values else None}

    resumed_latency, plain_latency = spread([r["latency_s"] for r in resumed]), spread([r["latency_s"] for r in plain])
    resumed_gap, plain_gap = spread([r["longest_gap_s"] for r in resumed]), spread([r["longest_gap_s"] for r in plain])
    extra = {q: (resumed_latency[q] - plain_latency[q]) if resumed and plain else None for q in ("p50_s", "p95_s")}
    return {"requests": len(rows), "answered_in_full": len(ok), "failed_requests": len(rows) - len(ok),
            "availability": len(ok) / len(rows) if rows else None,
            "identical": sum(1 for r in ok if r["identical"]),
            "not_identical": sum(1 for r in ok if not r["identical"]),
            "resumed_not_identical": sum(1 for r in resumed if not r["identical"]),
            "in_flight_at_kill": sum(1 for r in rows if r["in_flight_at_kill"]),
            "resumed_seen_by_clients": len(resumed), "resumed_counted": counted,
            "answered_after_retry": sum(1 for r in ok if r["retried"]),
            "latency": {"resumed": resumed_latency, "unresumed": plain_latency},
            "longest_gap": {"resumed": resumed_gap, "unresumed": plain_gap}, "resume_extra_latency_s": extra,
            "failures": [{k: r[k] for k in ("sent", "done", "status", "region", "retried", "prompt", "tokens", "error",
                                            "in_flight_at_kill", "kill_at")} for r in rows if r["status"] != 200]}


def counted_diff(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in after}


def failover(rc: Any, url: str, model: str, refs: dict[str, str]) -> dict[str, Any]:
    post_json(url, "/regions/routing", {"policy": "round_robin", "weights": {}})
    time.sleep(2)  # every router replica adopted it
    counted_before = router_counters(url)
    with StreamLoad(url, model) as load:
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
    samples = stream_rows(load.samples, refs, [("eu-west", t_kill)])
    figures = stream_figures(samples, counted_diff(router_counters(url), counted_before))
    log(f"failover streams: {_brief(figures)}")
    first_eu = min((s["done"] for s in samples if s["region"] == "eu-west" and s["sent"] > back["add_at"]
                    and s["status"] == 200), default=None)
    overheads = [v["router_overhead_s"] for v in final.values()]
    return {**kill, **back, **figures, "samples": samples,
            "first_eu_west_answer_s": None if first_eu is None else first_eu - back["add_at"],
            "router_overhead_s": max(overheads, key=lambda o: o["n"]),
            "events": {k: v["events"] for k, v in final.items()}}


def _brief(figures: dict[str, Any]) -> str:
    return (f"{figures['answered_in_full']}/{figures['requests']} answered in full, {figures['not_identical']} not "
            f"identical, resumed {figures['resumed_seen_by_clients']} (clients) / {figures['resumed_counted']} "
            f"(routers), extra latency {figures['resume_extra_latency_s']}, failures {figures['failures']}")


def cycles(rc: Any, url: str, model: str, refs: dict[str, str]) -> dict[str, Any]:
    """Repeated kills and restarts, a different region each time, under the same round-robin streaming load."""
    kills = []
    counted_before = router_counters(url)
    with StreamLoad(url, model) as load:
        time.sleep(3)
        for region in CYCLE_REGIONS:
            t_kill = rc.kill(region)
            time.sleep(KILL_HOLD_S)
            kills.append({**kill_figures(views(url), region, t_kill), **readmit(rc, url, region)})
            log(f"cycle {region}: {kills[-1]}")
            time.sleep(3)
    samples = stream_rows(load.samples, refs, [(k["region"], k["kill_at"]) for k in kills])
    figures = stream_figures(samples, counted_diff(router_counters(url), counted_before))
    log(f"cycle streams: {_brief(figures)}")
    return {"kills": kills, **figures, "samples": samples,
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
    """Answers per second in BIN_S bins by answering region (failed in red), retried answers marked, event lines."""
    lo = min(s["done"] for s in samples) - t0
    hi = max(s["done"] for s in samples) - t0
    bins = int((hi - lo) / BIN_S) + 1
    xs = [lo + i * BIN_S for i in range(bins)]
    series = {name: [0.0] * bins for name in (*REGIONS, "failed")}
    retried, resumed = [0.0] * bins, [0.0] * bins
    for s in samples:
        i = int((s["done"] - t0 - lo) / BIN_S)
        key = s["region"] if s["status"] == 200 and s["region"] in REGIONS else "failed"
        series[key][i] += 1 / BIN_S
        if s["retried"]:
            retried[i] += 1 / BIN_S
        if s.get("resumed"):
            resumed[i] += 1 / BIN_S
    bottom = [0.0] * bins
    colors = {"us-east": "tab:blue", "eu-west": "tab:orange", "ap-south": "tab:green", "failed": "tab:red"}
    for name, ys in series.items():
        ax.bar(xs, ys, width=BIN_S, align="edge", bottom=bottom, color=colors[name], label=name)
        bottom = [b + y for b, y in zip(bottom, ys)]
    for counts, style, label in ((retried, "kv", "answered after a retry"),
                                 (resumed, "m^", "resumed on another region")):
        points = [(x + BIN_S / 2, y) for x, y in zip(xs, counts) if y > 0]
        if points:
            ax.plot([x for x, _ in points], [y for _, y in points], style, ms=5, label=label)
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
    bottom.set_xlabel(f"streams answered per second ({BIN_S:g} s bins), by the region that began them")
    handles: dict[str, Any] = {}
    for ax in (top, bottom):
        handles.update(zip(*reversed(ax.get_legend_handles_labels())))
    top.legend(list(handles.values()), list(handles), fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.12),
               ncol=6, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def report(r: dict[str, Any], plotted: bool) -> str:
    fo, cy, oh, m = r["failover"], r["cycles"], r["overhead"], r["machine"]
    regions = "; ".join(f"{n} ${v['price_per_replica_hour']:.2f}/replica-hour, +{v['latency_ms']} ms"
                        for n, v in REGIONS.items())
    lines = ["## regions", "",
             f"`flock /tmp/llmstack-ray.lock timeout 900 python benchmarks/regions_bench.py` "
             f"({r['wall_s'] / 60:.1f} min on {m['cpus']} CPU cores shared with "
             f"other work, {m['cpu']}; Ray {m['ray']}; load average {m['load_avg_1m_at_start']:.1f} at start, "
             f"{m['load_avg_1m_at_end']:.1f} at the end). A real multi-node local Ray cluster (head for the "
             f"{ROUTERS} router replicas, Serve controller and proxy + one 1-CPU node per region, marked "
             "`region:<name>`), one tiny-model replica pinned per region, "
             f"real HTTP clients. Regions: {regions}; "
             "the offset is added by the router before dispatch (a stand-in for distance on one machine). "
             f"SLO: p95 <= {SLO_S} s. Probes every {ROUTING['probe_interval_s']} s, {ROUTING['probe_timeout_s']} s "
             "timeout; a region is routed around at its first sign (a probe unanswered at half the timeout, a "
             "failed probe or attempt) and ejected at the second failure (at once on a dead actor's error). "
             "Costs are the router's counters: each answer's replica-seconds (its time on the replica divided by "
             "its batch size, measured in the engine) x the region's price.", "",
             f"**Cost per policy** ({POLICY_S:.0f} s of load each, one after the other on the same cluster; {THREADS} "
             f"closed-loop clients, greedy completions of {MAX_TOKENS} tokens, not streamed)", ""]
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
              f"**Failover and re-admission** (round-robin load over the 3 regions, {STREAM_THREADS} clients "
              f"streaming greedy completions of {STREAM_TOKENS} tokens; eu-west's raylet SIGKILLed (then its node's "
              "other processes), 15 s later a new eu-west node joins)", "",
              "| figure | value |", "|---|---|",
              f"| kill to the last dispatch to eu-west (latest of the {ROUTERS} router replicas) | "
              f"**{fo['kill_to_last_dispatch_s']:.2f} s** |",
              f"| kill to the first sign (a slow or failed probe: eu-west routed around) | "
              f"{_s(fo['kill_to_first_sign_s'], 2)} |",
              f"| kill to eu-west ejected (first replica; the other by the board or its own probes) | "
              f"{_s(fo['kill_to_ejection_s'], 2)} |",
              f"| streams answered in full (every token and `[DONE]`) | {fo['answered_in_full']} of {fo['requests']} "
              f"({_failures(fo)}) |",
              f"| answered streams token-identical to their reference | {fo['identical']} of "
              f"{fo['answered_in_full']} |",
              f"| streams resumed on another region: seen by clients / counted by the routers | "
              f"{_resumed(fo)} |",
              f"| streams answered by another region after one retry (no output yet) | {fo['answered_after_retry']} "
              f"(routers: {fo['failed_attempts']} attempts failed on eu-west, {fo['moved_attempts']} waiting on it "
              "moved when it was ejected) |",
              f"| new node to eu-west re-admitted (first / all router replicas) | {_s(fo['first_readmission_s'])} / "
              f"{_s(fo['all_readmitted_s'])} |",
              f"| new node to eu-west's first answer | {_s(fo['first_eu_west_answer_s'])} |", "",
              f"**Repeated kills and restarts** ({len(cy['kills'])} kills in {cy['wall_s']:.0f} s, the same "
              f"{STREAM_THREADS} streaming clients: each region's raylet SIGKILLed in turn, twice round, a new node "
              f"{KILL_HOLD_S:.0f} s later, the next kill once every router replica re-admitted it)", "",
              "| region killed | kill to last dispatch | kill to first sign | kill to ejection | failed / moved "
              "attempts | streams in flight there (resumed) | new node to re-admitted (all replicas) |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for k in cy["kills"]:
        hit = [x for x in cy["samples"] if x["kill_at"] == k["kill_at"]]
        lines.append(f"| {k['region']} | {k['kill_to_last_dispatch_s']:.2f} s | {_s(k['kill_to_first_sign_s'], 2)} | "
                     f"{_s(k['kill_to_ejection_s'], 2)} | {k['failed_attempts']} / {k['moved_attempts']} | "
                     f"{len(hit)} ({sum(1 for x in hit if x['resumed'])}) | {_s(k['all_readmitted_s'])} |")
    worst = max([fo["kill_to_last_dispatch_s"], *(k["kill_to_last_dispatch_s"] for k in cy["kills"])])
    lat, gap, extra = cy["latency"], cy["longest_gap"], cy["resume_extra_latency_s"]
    lines += ["", f"Availability over the repeated kills: **{cy['availability']:.2%}** of {cy['requests']} streams "
              f"answered in full ({_failures(cy)}; target 100%, the source paper 99.97%, the last run before "
              f"resumption 99.82%{_bound(cy)}); "
              f"{cy['identical']} of {cy['answered_in_full']} answered streams token-identical to the answer recorded "
              f"before any fault ({cy['resumed_not_identical']} of the resumed ones differ). Streams resumed on "
              f"another region: {_resumed(cy)}; {cy['answered_after_retry']} more answered after one retry before "
              f"any output. Worst kill to last dispatch over the {1 + len(cy['kills'])} kills: **{worst:.2f} s** "
              "(target <= 2 s" + (")." if worst <= 2.0 else f": missed by {worst - 2.0:.2f} s)."), "",
              "**What a resume costs** (repeated kills; a stream is resumed as its client saw it when its output "
              "began on a region before that region's kill and it was answered in full after it; unresumed: the "
              "other streams answered in full with no retry)", "",
              "| streams | n | latency p50 / p95 | longest wait between tokens p50 / p95 |", "|---|---:|---:|---:|",
              f"| resumed | {lat['resumed']['n']} | {_pair(lat['resumed'])} | {_pair(gap['resumed'])} |",
              f"| unresumed | {lat['unresumed']['n']} | {_pair(lat['unresumed'])} | {_pair(gap['unresumed'])} |",
              "", "Extra latency of a resume (resumed minus unresumed): "
              + ("none resumed" if extra["p50_s"] is None else
                 f"**{extra['p50_s']:+.2f} s** p50, **{extra['p95_s']:+.2f} s** p95") + ": the wait for the dead "
              "node's stream to fail (Ray declares the node dead: health check 1 s x 3 on this test cluster) and "
              "the re-prefill of prompt + delivered tokens on the other region (plus its network offset).", "",
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
              "ejection (second failed probe), each retried once; a stream whose output had begun there fails "
              "when Ray declares the node dead (health check 1 s x 3 on this test cluster) and continues on "
              "another region after the tokens it had delivered (once: a second failure ends it with an error "
              "event).",
              "- On this loaded machine a healthy region's probe sometimes takes more than half the timeout (most "
              "often while a new node starts and loads the model): that region is routed around until its next "
              "passing probe, a period later; it costs no request.",
              "- Re-admission includes Serve placing and starting the replacement replica on the new node "
              "(model load) and then two passing probes in each router replica.", ""]
    if plotted:
        lines.append("![answers per second by region around the kills and re-admissions](results/regions_timeline.png)")
    return "\n".join(lines)


def _failures(part: dict[str, Any]) -> str:
    """The failed streams of a part, by how they ended."""
    if not part["failures"]:
        return "none failed"
    def kind(f: dict[str, Any]) -> str:
        how = "cut" if (f["error"] or "").startswith("cut") else "error event" if f["status"] == 599 else f["status"]
        return f"{how} after output began" if f["tokens"] else str(how)

    kinds = Counter(kind(f) for f in part["failures"])
    return "failed: " + ", ".join(f"{n} x {kind}" for kind, n in kinds.items())


def _resumed(part: dict[str, Any]) -> str:
    counted = part["resumed_counted"]
    return (f"{part['resumed_seen_by_clients']} / {counted['region_router']:.0f} (`llmstack_region_resumed_streams`; "
            f"the ingress's `llmstack_resumed_requests`: {counted['ingress']:.0f}) of "
            f"{part['in_flight_at_kill']} in flight on a killed region")


def _bound(part: dict[str, Any]) -> str:
    """With no failure, what so few streams can show: the failure rate's 95% upper bound (rule of three)."""
    if part["failed_requests"] or not part["requests"]:
        return ""
    return (f"; with no failure in {part['requests']} streams the failure rate is below "
            f"{3 / part['requests']:.2%} at 95% confidence, so this run alone cannot tell 100% from 99.97%")


def _pair(spread: dict[str, Any]) -> str:
    return "-" if spread["p50_s"] is None else f"{spread['p50_s']:.2f} / {spread['p95_s']:.2f} s"


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
            t = time.time()
            refs = references(url, model)  # before any fault
            results["references"] = {"prompts": len(refs), "seconds": time.time() - t, "answers": refs}
            log(f"{len(refs)} reference answers in {results['references']['seconds']:.0f} s")
            results["policies"] = {
                "cost": policy_run(url, model, "cost (cheapest meeting the SLO)", {"policy": "cost"}),
                "round_robin": policy_run(url, model, "round_robin", {"policy": "round_robin"}),
                "cheapest": policy_run(url, model, "cheapest-only (weights: ap-south 1)",
                                       {"weights": {"ap-south": 1}}),
            }
            results["failover"] = failover(rc, url, model, refs)
            results["cycles"] = cycles(rc, url, model, refs)
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
