"""Driver of the multi-region integration test: one real multi-node cluster, every check, results as JSON.

Run by test_regions_cluster.py in a subprocess of its own (the test session's Ray cluster lives in the
test process; a second cluster needs another process):

    RAY_TMPDIR=/tmp/x PYTHONPATH=src python tests/integration/regions/regions_driver.py --out result.json

Head (1 CPU: router, Serve controller, proxy) + one node per region (1 CPU, ``region:<name>``); each region
runs one tiny-model replica of 1 CPU, so no replica fits anywhere but its region's node.
Phases: deploy with a region that has no node (must fail, naming it), deploy, placement, routing per policy
(cost, latency, round_robin, manual weights, an SLO no region meets), failover on killed eu-west nodes
under load with the retry rule, re-admission when a new eu-west node joins, cost counters.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from region_cluster import Load, log  # noqa: E402

from llmstack.serve._region_cluster import (RegionCluster, get_json, node_resources, post_json, replica_nodes,
                                            replica_views, wait_for)

REGIONS = {
    "us-east": {"price_per_replica_hour": 3.0, "latency_ms": 0},
    "eu-west": {"price_per_replica_hour": 1.5, "latency_ms": 30},
    "ap-south": {"price_per_replica_hour": 0.8, "latency_ms": 700},
}
ROUTING = {"policy": "cost", "slo_p95_s": 0.6, "min_samples": 3, "window_s": 120, "eject_after_failures": 2,
           "readmit_after_probes": 2, "probe_interval_s": 0.5, "probe_timeout_s": 3.0, "attempt_timeout_s": 8,
           "router_replicas": 1}  # one router for the policy and failover checks (its turn, its samples)
# probe_timeout_s: a probe unanswered for half of it makes a region suspect (routed around); 1.5 s keeps a
# healthy replica on 2 loaded cores from ever looking slow during the exact-count policy checks
APP = "regions-it"


def serve_args(registry: str, port: int, regions: dict[str, Any] | None = None,
               routing: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"model": "tiny-lm@production", "registry": registry, "app_name": APP,
            "http": {"port": port, "host": "127.0.0.1"}, "regions": regions or REGIONS, "routing": routing or ROUTING,
            "engine": {"num_threads": 1, "max_batch_size": 4, "response_cache_size": 0, "default_max_tokens": 8,
                       "max_tokens_limit": 32, "batch_wait_timeout_s": 0.005},
            "deployment": {"max_ongoing_requests": 8, "max_queued_requests": -1, "ray_actor_options": {"num_cpus": 1.0}}}


def sequential(url: str, model: str, n: int) -> list[str | None]:
    import requests

    load = Load(url, model)
    session = requests.Session()
    regions = []
    for i in range(n):
        s = load.one(session, i, False)
        assert s.status == 200, f"request failed: {s.status}"
        regions.append(s.region)
    return regions


def wait_for_value(read: Any, timeout: float, period: float = 0.25) -> Any:
    """The first truthy value ``read()`` returns within ``timeout`` seconds (None: none did)."""
    seen: list[Any] = []
    wait_for(lambda: seen.append(read()) or seen[-1], timeout=timeout, period=period)
    return seen[-1] if seen and seen[-1] else None


def run(out: dict[str, Any], workdir: Path) -> None:
    from llmstack.errors import ResourceError
    from llmstack.serve._testing import make_registry
    from llmstack.serve.regions import cost_report, deploy_regions

    registry = str(workdir / "registry")
    make_registry(registry, adapters=0)
    t0 = time.time()
    rc = RegionCluster(list(REGIONS), temp_dir=os.environ["RAY_TMPDIR"]).start()
    out["cluster_start_s"] = time.time() - t0
    try:
        # --- a region with no nodes fails the deploy fast, by name
        t = time.time()
        try:
            deploy_regions(serve_args(registry, rc.http_port, {**REGIONS, "sa-east": {"price_per_replica_hour": 1}}))
            out["missing_region_error"] = None
        except ResourceError as exc:
            out["missing_region_error"] = str(exc)
        out["missing_region_error_s"] = time.time() - t

        t = time.time()
        dep = deploy_regions(serve_args(registry, rc.http_port))
        url = dep.url
        out["deploy_s"] = time.time() - t
        model = get_json(url, "/v1/models")["data"][0]["id"]
        log(f"deployed in {out['deploy_s']:.1f} s at {url}; model {model}")

        # --- placement: every region's replicas on nodes holding its marker, and only there
        resources = node_resources()
        out["placement"] = {dep_name: [sorted(k for k in resources.get(n, {}) if k.startswith("region:"))
                                       for n in nodes] for dep_name, nodes in replica_nodes(APP).items()}

        # --- cost: explores ap-south (700 ms offset, misses the 0.6 s SLO), then settles on eu-west
        out["cost_regions"] = sequential(url, model, 18)
        out["status_after_cost"] = get_json(url, "/regions")
        # --- latency: explores, then the lowest p95
        post_json(url, "/regions/routing", {"policy": "latency"})
        out["latency_regions"] = sequential(url, model, 12)
        # --- round robin
        post_json(url, "/regions/routing", {"policy": "round_robin"})
        out["round_robin_regions"] = sequential(url, model, 12)
        # --- manual weights override the policy; an unknown region is refused
        out["bad_weights"] = post_json(url, "/regions/routing", {"weights": {"mars": 1}})
        post_json(url, "/regions/routing", {"weights": {"us-east": 1}})
        out["weights_regions"] = sequential(url, model, 8)
        post_json(url, "/regions/routing", {"weights": {}})
        # --- an SLO no region meets: served anyway, flagged in status and metrics
        post_json(url, "/regions/routing", {"policy": "cost", "slo_p95_s": 0.0001})
        out["unmet_regions"] = sequential(url, model, 4)
        out["unmet_status"] = get_json(url, "/regions")["slo_unmet"]
        out["unmet_metric"] = [line for line in __import__("requests").get(url + "/metrics", timeout=10).text
                               .splitlines() if line.startswith("llmstack_region_slo_unmet ")]
        post_json(url, "/regions/routing", {"policy": "round_robin", "slo_p95_s": ROUTING["slo_p95_s"]})

        # --- failover: kill eu-west's node under load (round robin spreads load over every region)
        # Waits on outcomes, not fixed sleeps: the load is kept on until every region has answered it, then
        # until eu-west is ejected and a few requests sent after the ejection have been answered.
        with Load(url, model, threads=3, stream_threads=1) as load:
            wait_for(lambda: {s.region for s in load.samples if s.status == 200} >= set(REGIONS), timeout=30)
            t_kill = rc.kill("eu-west")
            log("eu-west killed")
            ejected_at = wait_for_value(lambda: None if (eu := get_json(url, "/regions")["regions"]["eu-west"])[
                "healthy"] else eu["ejected_at_wall"], timeout=30)
            log(f"eu-west ejected {ejected_at - t_kill:.1f} s after the kill" if ejected_at else "eu-west not ejected")
            wait_for(lambda: sum(s.sent > (ejected_at or t_kill) + 0.5 for s in list(load.samples)) >= 6, timeout=30)
        after_kill = get_json(url, "/regions")
        out["kill_at"] = t_kill
        out["failover_samples"] = [s.__dict__ for s in load.samples]
        out["resumed_after_kill"] = sum(  # streams that continued on another region (they answer 200)
            float(line.split()[-1]) for line in __import__("requests").get(url + "/metrics", timeout=30).text
            .splitlines() if line.startswith("llmstack_resumed_requests_total"))
        out["status_after_kill"] = after_kill

        # --- re-admission: a new eu-west node; Serve restarts the replica there; probes re-admit it
        t_add = time.time()
        rc.add("eu-west")
        log("eu-west node added")
        with Load(url, model, threads=2) as load:
            waited = wait_for(lambda: get_json(url, "/regions")["regions"]["eu-west"]["healthy"], timeout=150)
            out["readmit_wait_s"] = waited
            if waited is not None:  # until the re-admitted region has answered
                wait_for(lambda: any(s.region == "eu-west" and s.status == 200 for s in list(load.samples)),
                         timeout=30)
        out["add_at"] = t_add
        out["readmit_samples"] = [s.__dict__ for s in load.samples]
        out["status_final"] = get_json(url, "/regions")
        out["placement_final"] = {d: [sorted(k for k in node_resources().get(n, {}) if k.startswith("region:"))
                                      for n in nodes] for d, nodes in replica_nodes(APP).items()}

        # --- cost counters
        metrics = __import__("requests").get(url + "/metrics", timeout=10).text
        out["cost_report"] = cost_report(metrics)
        out["replica_seconds"] = {}
        for line in metrics.splitlines():
            if line.startswith("llmstack_region_replica_seconds_total{"):
                region = line.split('region="')[1].split('"')[0]
                out["replica_seconds"][region] = out["replica_seconds"].get(region, 0.0) + float(line.split()[-1])
        out["prices"] = {k: v["price_per_replica_hour"] for k, v in REGIONS.items()}

        # --- two router replicas: an override POSTed once reaches both (through the shared board)
        # an in-place update through Serve (the model deployments are unchanged and keep running; only the
        # router is replaced): deploy_regions(replace=True) cannot count what the old app frees without a dashboard
        from ray import serve

        from llmstack.serve.routing.regions_app import app_of, resolve_regions

        spec = resolve_regions(serve_args(registry, rc.http_port, routing={**ROUTING, "router_replicas": 2}))
        serve.run(app_of(spec), name=APP, route_prefix="/")
        out["placement_two_routers"] = replica_nodes(APP).get("RegionIngress")
        out["views_before"] = {k: v["weights"] for k, v in replica_views(url, 2, timeout=60).items()}
        posted = post_json(url, "/regions/routing", {"weights": {"ap-south": 1}})
        out["override_post"] = {k: posted.get(k) for k in ("status_code", "shared", "replica", "weights")}
        seen: dict[str, Any] = {}

        def both_adopted() -> bool:
            seen.update({k: v["weights"] for k, v in replica_views(url, 2, timeout=10).items()})
            return len(seen) >= 2 and all(w == {"ap-south": 1.0} for w in seen.values())

        out["override_wait_s"] = wait_for(both_adopted, timeout=30)
        out["override_views"] = seen
        dep.shutdown()
    finally:
        t = time.time()
        rc.shutdown()
        out["shutdown_s"] = time.time() - t


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out: dict[str, Any] = {"ok": False}
    start = time.time()
    try:
        with tempfile.TemporaryDirectory(prefix="llmstack-regions-") as tmp:
            run(out, Path(tmp))
        out["ok"] = True
    except BaseException as exc:  # reported, not raised: the test shows it
        out["error"] = f"{type(exc).__name__}: {exc}"
        out["traceback"] = traceback.format_exc()
    out["wall_s"] = time.time() - start
    Path(args.out).write_text(json.dumps(out, default=str, indent=1))
    log(f"done in {out['wall_s']:.0f} s (ok={out['ok']})")
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
