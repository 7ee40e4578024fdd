"""Serving benchmark: llmstack's Ray Serve app against the same model called directly with transformers.

Measured in one run, on one machine, against baselines from the same run:

1. throughput at 16 concurrent HTTP clients (dynamic batching) vs sequential batch-1 ``model.generate``;
2. per-request Serve overhead at low load: HTTP p50 minus the in-process engine p50 for the same request;
3. p50/p95 latency and time to first token (streamed) across a load sweep, with a PNG;
4. autoscaling: replicas and queue depth over time under a rising and falling load, with a PNG;
5. the response cache: repeated identical greedy requests, hit vs miss latency.

Writes benchmarks/results/serve.json, serve_latency.png, serve_autoscaling.png and the ``## serve``
section of benchmarks/RESULTS.md.

Reproduce: python benchmarks/serve_bench.py            (about 5 minutes on 2 CPU cores)
           python benchmarks/serve_bench.py --part peer   (vs vLLM-CPU: see benchmarks/peer_bench.py)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from harness import RESULTS_DIR as RESULTS
from harness import logger, pct, write_json, write_section
from harness.cluster import start_ray, start_serve
from harness.loadgen import PROMPTS, closed_loop, send_completion
from harness.peers import add_peer_arguments, deploy_app, peer_argv
from harness.plots import pyplot

log = logger("serve-bench")


# --------------------------------------------------------------------------- direct baselines


def direct_generate_baseline(model: Any, tokenizer: Any, n: int, max_tokens: int) -> dict[str, float]:
    """Sequential batch-1 ``model.generate`` (greedy, KV cache): the plain-transformers way to serve."""
    import torch

    torch.set_num_threads(1)  # a replica gets one CPU; so does the baseline
    latencies, tokens = [], 0
    with torch.inference_mode():
        for i in range(n):
            enc = tokenizer(PROMPTS[i % len(PROMPTS)], return_tensors="pt", add_special_tokens=False)
            start = time.perf_counter()
            out = model.generate(**enc, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            latencies.append(time.perf_counter() - start)
            tokens += out.shape[1] - enc["input_ids"].shape[1]
    total = sum(latencies)
    return {"requests": n, "tokens": tokens, "seconds": total, "tokens_per_s": tokens / total,
            "p50_s": pct(latencies, 50)}


def direct_engine_latency(model: Any, tokenizer: Any, n: int, max_tokens: int) -> dict[str, float]:
    """The engine in-process (no HTTP, no Ray): the same work a replica does for one request."""
    from llmstack.serve.engine import ServedModel, TransformersEngine
    from llmstack.serve.protocol import GenerationRequest, SamplingParams

    engine = TransformersEngine(ServedModel(model, tokenizer, "tiny-lm", "tiny-lm@v1", "bench"), cache_size=0)
    latencies = []

    async def run() -> None:
        for i in range(n):
            request = GenerationRequest(model="tiny-lm", prompt=PROMPTS[i % len(PROMPTS)],
                                        sampling=SamplingParams(max_tokens=max_tokens, temperature=0))
            start = time.perf_counter()
            await engine.generate(request)
            latencies.append(time.perf_counter() - start)

    asyncio.run(run())
    engine.shutdown()
    return {"p50_s": pct(latencies, 50), "p95_s": pct(latencies, 95), "requests": n}


def engine_batching(model: Any, tokenizer: Any, max_tokens: int, rounds: int) -> dict[str, float]:
    """In-process engine: 16 requests decoded as one batch vs one at a time (no HTTP, no Ray)."""
    from llmstack.serve.engine import ServedModel, TransformersEngine
    from llmstack.serve.protocol import GenerationRequest, SamplingParams

    engine = TransformersEngine(ServedModel(model, tokenizer, "tiny-lm", "tiny-lm@v1", "bench"), cache_size=0)

    def requests() -> list[Any]:
        return [GenerationRequest(model="tiny-lm", prompt=PROMPTS[i], sampling=SamplingParams(
            max_tokens=max_tokens, temperature=0)) for i in range(16)]

    async def one_by_one() -> int:
        total = 0
        for request in requests():
            total += (await engine.generate(request)).completion_tokens
        return total

    async def batched() -> int:
        return sum(r.completion_tokens for r in await engine.generate_batch(requests()))

    ratios, single, together = [], [], []
    for _ in range(rounds):
        start = time.perf_counter()
        tokens = asyncio.run(one_by_one())
        single.append(tokens / (time.perf_counter() - start))
        start = time.perf_counter()
        tokens = asyncio.run(batched())
        together.append(tokens / (time.perf_counter() - start))
        ratios.append(together[-1] / single[-1])
    engine.shutdown()
    return {"batch_1_tokens_per_s": statistics.median(single), "batch_16_tokens_per_s": statistics.median(together),
            "ratio": statistics.median(ratios)}


# --------------------------------------------------------------------------- HTTP load


def sequential_latency(url: str, n: int, body: dict[str, Any]) -> list[float]:
    """Latencies of ``n`` requests sent one after another on one keep-alive connection, each with a new
    seed (the response cache keys on it)."""
    import requests

    session = requests.Session()
    latencies = []
    for i in range(n):
        start = time.perf_counter()
        r = session.post(url + "/v1/completions", json={**body, "seed": body.get("seed", 0) + i}, timeout=60)
        latencies.append(time.perf_counter() - start)
        assert r.status_code == 200, r.text
    return latencies


def hop_breakdown(url: str, cached_body: dict[str, Any], n: int) -> dict[str, float]:
    """Where the per-request overhead goes, from requests that do no model work (p50 ms, keep-alive).

    ``GET /v1/models`` is answered by the ingress alone (proxy -> ingress); a response-cache hit
    crosses every hop (proxy -> ingress -> model replica) without a forward pass; the same cache hit
    through a deployment handle from this process is one hop into the model replica.
    """
    import requests
    from ray import serve

    from llmstack.serve.protocol import GenerationRequest, SamplingParams

    session = requests.Session()

    def p50(fn: Any) -> float:
        for _ in range(3):
            fn()
        times = []
        for _ in range(n):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return pct(times, 50) * 1000

    handle = serve.get_deployment_handle("LLMServer", app_name="bench")
    sampling = SamplingParams(max_tokens=cached_body["max_tokens"], temperature=0, seed=cached_body["seed"])
    request = GenerationRequest(model="tiny-lm", prompt=cached_body["prompt"], sampling=sampling)
    return {"models_p50_ms": p50(lambda: session.get(url + "/v1/models", timeout=30)),
            "cache_hit_p50_ms": p50(lambda: session.post(url + "/v1/completions", json=cached_body, timeout=30)),
            "handle_hit_p50_ms": p50(lambda: handle.generate.remote(
                request.model_copy(update={"request_id": os.urandom(8).hex()})).result())}


# --------------------------------------------------------------------------- autoscaling


def autoscaling_run(url: str, app_name: str, profile: list[tuple[float, int]], max_tokens: int) -> list[dict]:
    """Drive ``profile`` (seconds, clients) and sample replicas and in-flight requests every 0.5 s."""
    from ray import serve

    timeline: list[dict] = []
    state = {"clients": 0, "stop": False, "in_flight": 0}
    lock = threading.Lock()

    async def driver() -> None:
        import httpx

        async with httpx.AsyncClient(timeout=300) as client:
            async def worker(w: int) -> None:
                k = 0
                while not state["stop"]:
                    if w >= state["clients"]:
                        await asyncio.sleep(0.05)
                        continue
                    with lock:
                        state["in_flight"] += 1
                    try:
                        await send_completion(client, url, {"prompt": PROMPTS[(w + k) % len(PROMPTS)], "max_tokens": max_tokens,
                                                 "temperature": 0, "seed": 10**6 + w * 10_000 + k})
                    finally:
                        with lock:
                            state["in_flight"] -= 1
                    k += 1

            await asyncio.gather(*(worker(w) for w in range(max(c for _, c in profile))))

    thread = threading.Thread(target=lambda: asyncio.run(driver()), daemon=True)
    thread.start()
    start = time.time()
    for duration, clients in profile:
        state["clients"] = clients
        phase_end = time.time() + duration
        while time.time() < phase_end:
            status = serve.status().applications[app_name].deployments["LLMServer"]
            timeline.append({"t": round(time.time() - start, 2), "clients": clients,
                             "replicas": int(status.replica_states.get("RUNNING", 0)),
                             "in_flight": state["in_flight"]})
            time.sleep(0.5)
    state["stop"] = True
    thread.join(timeout=120)
    return timeline


# --------------------------------------------------------------------------- report


def plot_latency(sweep: list[dict], path: Path) -> None:
    plt = pyplot()
    x = [s["clients"] for s in sweep]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(x, [s["latency_p50_s"] * 1000 for s in sweep], "o-", label="latency p50")
    ax1.plot(x, [s["latency_p95_s"] * 1000 for s in sweep], "o--", label="latency p95")
    ax1.plot(x, [s["ttft_p50_s"] * 1000 for s in sweep], "s-", label="TTFT p50")
    ax1.plot(x, [s["ttft_p95_s"] * 1000 for s in sweep], "s--", label="TTFT p95")
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("concurrent clients")
    ax1.set_ylabel("ms")
    ax1.set_title("latency vs load (streamed)")
    ax1.legend()
    ax2.plot(x, [s["tokens_per_s"] for s in sweep], "o-")
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("concurrent clients")
    ax2.set_ylabel("generated tokens / s")
    ax2.set_title("throughput vs load")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_autoscaling(timeline: list[dict], path: Path) -> None:
    plt = pyplot()
    t = [p["t"] for p in timeline]
    fig, ax = plt.subplots(figsize=(9, 3.8))
    ax.step(t, [p["clients"] for p in timeline], where="post", label="clients (offered load)", color="grey")
    ax.plot(t, [p["in_flight"] for p in timeline], label="requests in flight (queue depth)", alpha=0.7)
    ax.set_xlabel("seconds")
    ax.set_ylabel("requests")
    ax2 = ax.twinx()
    ax2.step(t, [p["replicas"] for p in timeline], where="post", color="red", label="running replicas")
    ax2.set_ylabel("replicas")
    ax2.set_ylim(0, max(p["replicas"] for p in timeline) + 1)
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    labels = ax.get_legend_handles_labels()[1] + ax2.get_legend_handles_labels()[1]
    ax.legend(lines, labels, loc="upper right", fontsize=8)
    ax.set_title("queue-depth autoscaling under a rising and falling load")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _haproxy_text(ha: dict[str, Any]) -> list[str]:
    hover, hthr = ha["overhead"], ha["throughput"]
    return [
        "**Behind Serve's HAProxy ingress.** The rows marked HAProxy come from the same app, same model and "
        "same requests in a second, fresh Ray cluster started with `RAY_SERVE_ENABLE_HA_PROXY=1` (Ray's "
        "C load balancer forwards HTTP straight to the ingress replica instead of through Serve's Python "
        "proxy actor; llmstack needs no change, the variable only has to be in the environment of whatever "
        "starts Ray -- `ray start`, or the script that calls `deploy()`). There: `GET /v1/models` "
        f"{hover['models_p50_ms']:.1f} ms, a cache hit through every hop {hover['cache_hit_p50_ms']:.1f} ms, "
        f"`GET /health` {hover['health_p50_ms']:.1f} ms; per-round 16-client ratios vs `generate`: "
        + ", ".join(f"{x['ratio_vs_generate']:.1f}x" for x in hthr["rounds"]) + ". HAProxy binds the HTTP "
        "port on all interfaces.",
        "",
    ]


def markdown(r: dict[str, Any]) -> str:
    thr = r["throughput"]
    over = r["overhead"]
    engine = r["app"].get("engine", r["app"])  # older result files: a flat app config
    auto = r["autoscaling"]
    cache = r["cache"]
    lines = [
        "## serve",
        "",
        f"Reproduce: `python benchmarks/serve_bench.py` ({r['wall_s']:.0f} s on {r['machine']}). "
        "Raw numbers: `benchmarks/results/serve.json`; plots: `benchmarks/results/serve_latency.png`, "
        "`benchmarks/results/serve_autoscaling.png`.",
        "",
        f"Model: `tiny` preset ({r['params'] / 1e6:.1f}M parameters, random init, BPE vocabulary {r['vocab']}), "
        f"fp32 on CPU; every request generates {r['max_tokens']} tokens greedily from a ~{r['prompt_tokens']}-token "
        "prompt. The app is the one `deploy()` builds: ingress + one `LLMServer` replica (1 CPU, 1 torch thread) "
        f"with `engine.max_batch_size={engine['max_batch_size']}`, "
        f"`engine.batch_wait_timeout_s={engine['batch_wait_timeout_s']}`. "
        "Baselines run in the benchmark process with one torch thread. Load comes from an asyncio HTTP client "
        "on the same 2 cores, so absolute numbers are pessimistic; the ratios are the point.",
        "",
        "| measurement | value | baseline (same run) | ratio |",
        "|---|---:|---:|---:|",
        f"| throughput, 16 concurrent HTTP clients, batched | {thr['median']['serve_16_tokens_per_s']:.0f} tok/s | "
        f"{thr['median']['direct_tokens_per_s']:.0f} tok/s sequential batch-1 `model.generate` | "
        f"**{thr['ratio_vs_generate']:.1f}x** (target >= 4x) |",
        f"| same, vs 1 HTTP client (batch 1 through Serve) | {thr['median']['serve_16_tokens_per_s']:.0f} tok/s | "
        f"{thr['median']['serve_1_tokens_per_s']:.0f} tok/s | {thr['ratio_vs_serve_1']:.1f}x |",
        f"| engine in-process (no HTTP, no Ray), 16 requests as one batch | "
        f"{thr['in_process']['batch_16_tokens_per_s']:.0f} tok/s | "
        f"{thr['in_process']['batch_1_tokens_per_s']:.0f} tok/s one at a time | {thr['in_process']['ratio']:.1f}x |",
        f"| Serve overhead per request at low load, p50 | {over['overhead_p50_ms']:.1f} ms "
        f"(HTTP {over['http_p50_ms']:.1f} ms) | {over['engine_p50_ms']:.1f} ms engine in-process | "
        f"target <= 10 ms |",
        f"| response cache, identical greedy request, p50 | {cache['hit_p50_ms']:.1f} ms hit | "
        f"{cache['miss_p50_ms']:.1f} ms miss | {cache['miss_p50_ms'] / cache['hit_p50_ms']:.1f}x faster |",
    ]
    ha = r.get("haproxy")
    if ha:
        hthr, hover = ha["throughput"], ha["overhead"]
        lines += [
            f"| **behind Serve's HAProxy ingress**: throughput, 16 concurrent HTTP clients | "
            f"{hthr['median']['serve_16_tokens_per_s']:.0f} tok/s | {hthr['median']['direct_tokens_per_s']:.0f} tok/s "
            f"sequential batch-1 `model.generate` | **{hthr['ratio_vs_generate']:.1f}x** (target >= 4x) |",
            f"| **behind HAProxy**: Serve overhead per request at low load, p50 | {hover['overhead_p50_ms']:.1f} ms "
            f"(HTTP {hover['http_p50_ms']:.1f} ms) | {hover['engine_p50_ms']:.1f} ms engine in-process | "
            "target <= 10 ms |",
        ]
    lines += [
        "",
        f"Throughput figures are medians over {len(thr['rounds'])} interleaved rounds (baseline, then 16 clients, "
        "then 1 client), each ratio taken within its round; per-round ratios vs `generate`: "
        + ", ".join(f"{r['ratio_vs_generate']:.1f}x" for r in thr["rounds"]) + ". "
        f"The replica decoded {thr['replica_stats']['generated_tokens']} tokens in "
        f"{thr['replica_stats']['forward_passes']} forward passes ({thr['replica_stats']['batches']} prefill "
        f"admissions; largest decode batch {thr['replica_stats']['max_batch_size']}): requests join the running "
        "batch at step boundaries (iteration-level batching), so a new request never waits for a batch to drain.",
        "",
        f"Overhead = p50 of {over['requests']} sequential 1-token HTTP requests minus p50 of the same "
        "requests on the engine in-process (same model, same thread count); it covers the proxy, the "
        "ingress (auth, validation, metrics), two handle hops and the batch queue. For scale: `GET /health`, "
        f"which crosses the same proxy -> ingress -> model-replica hops without generating, has p50 "
        f"{over['health_p50_ms']:.1f} ms in the same run.",
        "",
        "Where it goes, from requests that do no model work (p50, keep-alive connections):"
        + (f" `GET /v1/models`, answered by the ingress alone (proxy -> ingress), {over['models_p50_ms']:.1f} ms; "
           f"a response-cache hit through every hop (proxy -> ingress -> model replica, no forward pass) "
           f"{over['cache_hit_p50_ms']:.1f} ms; the same cache hit sent from a deployment handle in the "
           f"benchmark process straight to the model replica {over['handle_hit_p50_ms']:.1f} ms. So the proxy "
           f"hop costs about {over['models_p50_ms']:.0f} ms and the ingress's call into the model replica about "
           f"{over['cache_hit_p50_ms'] - over['models_p50_ms']:.0f} ms, "
           f"{(over['cache_hit_p50_ms'] - over['models_p50_ms']) / over['handle_hit_p50_ms']:.1f}x the same call "
           "made from a driver: on 2 cores, the two Serve replica processes' threads (event loop, router loop, "
           "Ray core worker) contend with each other and with the load generator. The proxy hop alone takes "
           "most of the 10 ms budget on this machine, while the app code's own work is small (the ingress "
           "answers `/v1/models` in under 1 ms in-process)."
           if "models_p50_ms" in over else " not measured in this run."),
        "",
        *(_haproxy_text(r["haproxy"]) if r.get("haproxy") else []),
        "**Latency and time to first token across load** (streamed requests, closed loop; "
        "`benchmarks/results/serve_latency.png`):",
        "",
        "| clients | tok/s | req/s | latency p50 | latency p95 | TTFT p50 | TTFT p95 |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in r["sweep"]:
        lines.append(f"| {s['clients']} | {s['tokens_per_s']:.0f} | {s['requests_per_s']:.1f} | "
                     f"{s['latency_p50_s'] * 1000:.0f} ms | {s['latency_p95_s'] * 1000:.0f} ms | "
                     f"{s['ttft_p50_s'] * 1000:.0f} ms | {s['ttft_p95_s'] * 1000:.0f} ms |")
    lines += [
        "",
        f"**Autoscaling** (`benchmarks/results/serve_autoscaling.png`): min 1 / max {auto['max_replicas']} replicas, "
        f"`target_ongoing_requests={auto['target']}`, upscale delay {auto['upscale_delay_s']} s, downscale delay "
        f"{auto['downscale_delay_s']} s. Load profile (seconds x clients): {', '.join(f'{s:g} s x {c}' for s, c in auto['profile'])}. "
        f"Replicas went 1 -> {auto['peak_replicas']} after {auto['scale_up_after_s']} s of load and back to "
        f"{auto['final_replicas']} {auto['scale_down_after_s']} s after the load stopped; "
        f"peak in-flight requests {auto['peak_in_flight']}.",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def measure_overhead(url: str, engine_1tok: dict[str, float], scale: float, mt: int) -> tuple[dict, dict]:
    """Per-request overhead at low load (and where it goes), and the response cache's hit vs miss."""
    import requests as rq

    log("Serve overhead at low load")
    http_1tok = sequential_latency(url, max(10, int(60 * scale)), {"prompt": PROMPTS[3], "max_tokens": 1,
                                                                    "temperature": 0, "seed": 1})
    session = rq.Session()
    health = []
    for _ in range(len(http_1tok)):
        start = time.perf_counter()
        session.get(url + "/health", timeout=30)
        health.append(time.perf_counter() - start)
    overhead = {"http_p50_ms": pct(http_1tok, 50) * 1000, "engine_p50_ms": engine_1tok["p50_s"] * 1000,
                "requests": len(http_1tok), "health_p50_ms": pct(health, 50) * 1000}
    overhead["overhead_p50_ms"] = overhead["http_p50_ms"] - overhead["engine_p50_ms"]
    log(f"  HTTP p50 {overhead['http_p50_ms']:.1f} ms, overhead {overhead['overhead_p50_ms']:.1f} ms")

    log("response cache: identical greedy requests")
    miss = sequential_latency(url, max(5, int(20 * scale)), {"prompt": PROMPTS[5], "max_tokens": mt,
                                                              "temperature": 0, "seed": 5000})
    same = {"prompt": PROMPTS[5], "max_tokens": mt, "temperature": 0, "seed": 4242}
    sequential_latency(url, 1, same)
    overhead.update(hop_breakdown(url, same, max(10, int(60 * scale))))  # its cache hits are the hit latency
    cache = {"miss_p50_ms": pct(miss, 50) * 1000, "hit_p50_ms": overhead["cache_hit_p50_ms"]}
    log(f"  hops: proxy->ingress {overhead['models_p50_ms']:.1f} ms, cache hit end to end "
        f"{overhead['cache_hit_p50_ms']:.1f} ms, driver handle -> model replica {overhead['handle_hit_p50_ms']:.1f} ms")
    return overhead, cache


def measure_throughput(url: str, model: Any, tokenizer: Any, mt: int, rounds_n: int) -> dict[str, Any]:
    """16 and 1 concurrent clients against sequential batch-1 ``generate``, in interleaved rounds."""
    from ray import serve

    log("throughput: 1 and 16 concurrent clients, interleaved with the baseline")
    # The machine is shared and noisy: alternate baseline and Serve in short rounds and take the median
    # of the per-round ratios, so both sides of each ratio saw the same background load.
    rounds = []
    for k in range(rounds_n):
        base = direct_generate_baseline(model, tokenizer, 8, mt)
        s16 = asyncio.run(closed_loop(url, clients=16, requests_per_client=2, max_tokens=mt, seed_base=2 + 10**5 * k))
        s1 = asyncio.run(closed_loop(url, clients=1, requests_per_client=6, max_tokens=mt, seed_base=3 + 10**5 * k))
        rounds.append({"direct_tokens_per_s": base["tokens_per_s"], "serve_16_tokens_per_s": s16["tokens_per_s"],
                       "serve_1_tokens_per_s": s1["tokens_per_s"],
                       "ratio_vs_generate": s16["tokens_per_s"] / base["tokens_per_s"],
                       "ratio_vs_serve_1": s16["tokens_per_s"] / s1["tokens_per_s"]})
        log(f"  round {k}: generate {base['tokens_per_s']:.0f}, serve x1 {s1['tokens_per_s']:.0f}, "
            f"serve x16 {s16['tokens_per_s']:.0f} tok/s")
    med = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    server = serve.get_deployment_handle("LLMServer", app_name="bench").stats.remote().result()
    log(f"  replica: {server['generated_tokens']} tokens in {server['forward_passes']} forward passes "
        f"({server['batches']} admissions), largest decode batch {server['max_batch_size']}")
    log(f"  median: 16 clients = {med['ratio_vs_generate']:.1f}x generate, {med['ratio_vs_serve_1']:.1f}x one client")
    return {"rounds": rounds, "median": med, "replica_stats": server, "ratio_vs_generate": med["ratio_vs_generate"],
            "ratio_vs_serve_1": med["ratio_vs_serve_1"]}


def start_app(info: dict[str, Any], app_cfg: dict[str, Any]) -> Any:
    from llmstack.config import merge_sections

    start_ray(4)
    port = start_serve()
    base = {"model": "tiny-lm@production", "registry": info["registry"].url, "app_name": "bench",
            "http": {"port": port}, "engine": {"max_tokens_limit": 128},
            "deployment": {"ray_actor_options": {"num_cpus": 1}}}
    dep = deploy_app(merge_sections(base, app_cfg), warm_up=5)
    log(f"app at {dep.url}")
    return dep


def haproxy_part(args: argparse.Namespace) -> dict[str, Any]:
    """Overhead and throughput again, in a fresh Ray cluster whose Serve runs the HAProxy ingress.

    ``RAY_SERVE_ENABLE_HA_PROXY=1`` must be in the environment before Ray starts, so this runs as a
    subprocess of the benchmark.
    """
    out = Path(tempfile.mkdtemp(prefix="serve-bench-haproxy-")) / "part.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--ingress-part", str(out),
               "--max-tokens", str(args.max_tokens)] + (["--quick"] if args.quick else [])
    log("the same app behind Serve's HAProxy ingress (RAY_SERVE_ENABLE_HA_PROXY=1), in a fresh Ray cluster")
    subprocess.run(command, check=True, env={**os.environ, "RAY_SERVE_ENABLE_HA_PROXY": "1"})
    return json.loads(out.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="fewer requests (smoke run)")
    parser.add_argument("--ingress-part", metavar="OUT", help=argparse.SUPPRESS)  # see haproxy_part()
    parser.add_argument("--skip-haproxy", action="store_true", help="do not repeat the run behind HAProxy")
    parser.add_argument("--render-only", action="store_true",
                        help="re-render the serve section of RESULTS.md from benchmarks/results/serve.json")
    parser.add_argument("--part", choices=("serve", "peer"), default="serve",
                        help="peer: llmstack vs vLLM-CPU on the same model (benchmarks/peer_bench.py)")
    add_peer_arguments(parser)
    args = parser.parse_args()
    if args.part == "peer":  # its own script, in a process of its own
        return subprocess.run([sys.executable, str(Path(__file__).with_name("peer_bench.py")), *peer_argv(args)]).returncode
    if args.render_only:
        write_section("serve", markdown(json.loads((RESULTS / "serve.json").read_text())))
        return 0
    t0 = time.time()
    scale = 1 if not args.quick else 0.25

    import ray
    from ray import serve

    import llmstack
    from llmstack.models import count_parameters
    from llmstack.serve._testing import make_registry

    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="serve-bench-")
    info = make_registry(str(Path(tmp) / "registry"), adapters=0)
    model, tokenizer = info["torch_model"], info["tokenizer"]
    prompt_tokens = round(statistics.mean(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in PROMPTS))
    mt = args.max_tokens

    log("baseline: the engine in-process, 1-token requests")
    direct_generate_baseline(model, tokenizer, 2, mt)  # warm-up
    engine_1tok = direct_engine_latency(model, tokenizer, max(10, int(60 * scale)), 1)
    log(f"  engine 1-token p50 {engine_1tok['p50_s'] * 1000:.1f} ms")
    in_process = None
    if not args.ingress_part:
        in_process = engine_batching(model, tokenizer, mt, 3 if not args.quick else 1)
        log(f"  engine in-process: 16 batched {in_process['batch_16_tokens_per_s']:.0f} tok/s = "
            f"{in_process['ratio']:.1f}x one at a time")

    app_cfg = {"engine": {"max_batch_size": 16, "batch_wait_timeout_s": 0.0},
               "deployment": {"max_ongoing_requests": 64, "max_queued_requests": -1}}
    dep = start_app(info, app_cfg)
    url, port = dep.url, int(dep.url.rsplit(":", 1)[1].split("/")[0])

    overhead, cache = measure_overhead(url, engine_1tok, scale, mt)
    throughput = measure_throughput(url, model, tokenizer, mt, 5 if not args.quick else 2)
    throughput["in_process"] = in_process
    if args.ingress_part:
        Path(args.ingress_part).write_text(json.dumps({"overhead": overhead, "cache": cache,
                                                       "throughput": throughput}))
        serve.shutdown()
        ray.shutdown()
        return 0

    log("latency / TTFT sweep")
    sweep = []
    for clients in (1, 2, 4, 8, 16, 32):
        per_client = max(2, int((16 if clients <= 4 else 4 if clients <= 16 else 2) * scale))
        point = asyncio.run(closed_loop(url, clients=clients, requests_per_client=per_client, max_tokens=mt,
                                        stream=True, seed_base=100 * clients))
        sweep.append(point)
        log(f"  {clients:>2} clients: p50 {point['latency_p50_s'] * 1000:.0f} ms, "
            f"TTFT p50 {point['ttft_p50_s'] * 1000:.0f} ms, {point['tokens_per_s']:.0f} tok/s")
    plot_latency(sweep, RESULTS / "serve_latency.png")
    dep.shutdown()

    log("autoscaling under a rising and falling load")
    auto_cfg = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2, "upscale_delay_s": 1,
                "downscale_delay_s": 4, "look_back_period_s": 2, "metrics_interval_s": 0.5}
    adep = llmstack.deploy({"model": "tiny-lm@production", "registry": info["registry"].url, "app_name": "bench-auto",
                            "http": {"port": port, "route_prefix": "/auto"},
                            "engine": {"max_batch_size": 4, "response_cache_size": 0},
                            "deployment": {"max_ongoing_requests": 8, "max_queued_requests": -1,
                                           "ray_actor_options": {"num_cpus": 1}},
                            "autoscaling": auto_cfg})
    profile = [(5, 1), (15, 4), (20, 12), (10, 4), (20, 0)] if not args.quick else [(3, 1), (10, 12), (12, 0)]
    timeline = autoscaling_run(adep.url, "bench-auto", profile, mt)
    adep.shutdown()
    plot_autoscaling(timeline, RESULTS / "serve_autoscaling.png")
    load_start = next((p["t"] for p in timeline if p["clients"] > 1), 0.0)
    up = next((p["t"] for p in timeline if p["replicas"] > 1), None)
    load_end = max((p["t"] for p in timeline if p["clients"] > 0), default=0.0)
    down = next((p["t"] for p in timeline if p["t"] > load_end and p["replicas"] <= 1), None)
    autoscaling = {"profile": profile, "timeline": timeline, "max_replicas": auto_cfg["max_replicas"],
                   "target": auto_cfg["target_ongoing_requests"], "upscale_delay_s": auto_cfg["upscale_delay_s"],
                   "downscale_delay_s": auto_cfg["downscale_delay_s"],
                   "peak_replicas": max(p["replicas"] for p in timeline),
                   "final_replicas": timeline[-1]["replicas"],
                   "scale_up_after_s": round(up - load_start, 1) if up is not None else None,
                   "scale_down_after_s": round(down - load_end, 1) if down is not None else None,
                   "peak_in_flight": max(p["in_flight"] for p in timeline)}
    serve.shutdown()
    ray.shutdown()
    haproxy = None if args.skip_haproxy else haproxy_part(args)

    import torch

    results = {"machine": f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
                          f"torch {torch.__version__}, ray {ray.__version__}, python {sys.version.split()[0]}",
               "params": count_parameters(model), "vocab": len(tokenizer), "max_tokens": mt,
               "prompt_tokens": prompt_tokens, "app": app_cfg, "throughput": throughput, "overhead": overhead,
               "cache": cache, "sweep": sweep, "autoscaling": autoscaling, "haproxy": haproxy,
               "wall_s": time.time() - t0}
    if args.quick:  # smoke run: print the section, keep the recorded results
        print(markdown(results))
    else:
        write_json("serve", results, indent=2)
        write_section("serve", markdown(results))
    log(f"done in {results['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
