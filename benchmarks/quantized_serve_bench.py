"""Quantized serving through deploy(): dynamic int8 vs fp32 tokens/s on the `small` and `base` presets (issue #13).

Both versions of a preset are registered, the int8 one made by ``quantize()``, and served side by side by
``llmstack.deploy()`` as shipped (default thread count, response cache off) on one local Ray cluster. Rounds
alternate which app goes first; each ratio is taken within its round, and the median is reported.

    python benchmarks/quantized_serve_bench.py            # small and base, 3 rounds (~6 min on 2 cores)
    python benchmarks/quantized_serve_bench.py --presets small --rounds 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import cpu_name, free_port, markdown_table, write_json, write_section
from harness.cluster import start_ray
from harness.loadgen import closed_loop

PROMPT = "def parse_config(path):\n    \"\"\"Read the file at path and"


def load(url: str, model: str, *, clients: int, requests_each: int, max_tokens: int) -> dict[str, float]:
    """``clients`` closed-loop HTTP clients (the harness's), ``requests_each`` greedy completions each of
    ``PROMPT``: generated tokens/s."""
    result = asyncio.run(closed_loop(url, clients=clients, requests_per_client=requests_each, max_tokens=max_tokens,
                                     prompts=[PROMPT], extra={"model": model, "ignore_eos": True}))
    if result["ok"] != result["requests"]:
        raise RuntimeError(f"{url}: {result['requests'] - result['ok']} of {result['requests']} requests failed")
    return {"tokens_per_s": result["tokens_per_s"], "wall_s": result["seconds"], "tokens": result["tokens"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="small,base")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", default="1,4")
    parser.add_argument("--requests-each", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    presets = [p for p in args.presets.split(",") if p]
    client_counts = [int(c) for c in args.clients.split(",")]

    import ray
    import torch
    from tqdm.auto import tqdm

    import llmstack
    from llmstack.data import load_corpus, train_tokenizer
    from llmstack.models import build_model, register_model
    from llmstack.quantize import quantize
    from llmstack.registry import Registry

    t_begin = time.time()
    start_ray(4, object_store_memory=300_000_000, worker_env={"TOKENIZERS_PARALLELISM": "false"})
    workdir = Path(tempfile.mkdtemp(prefix="qserve-"))
    registry = Registry(str(workdir / "registry"))
    tokenizer = train_tokenizer(load_corpus("builtin:stdlib").documents, vocab_size=4096)
    port = free_port()
    results: dict[str, Any] = {"presets": {}, "clients": client_counts, "max_tokens": args.max_tokens,
                               "requests_each": args.requests_each, "rounds": args.rounds}
    for preset in presets:
        model = build_model(preset, vocab_size=len(tokenizer), max_seq_len=512, seed=0, tokenizer=tokenizer)
        params = sum(p.numel() for p in model.parameters())
        fp32 = register_model(registry, f"{preset}-lm", model.eval(), tokenizer, kind="model")
        int8 = quantize({"evaluation": {"enabled": False}}, source=str(fp32), method="int8-dynamic", registry=registry,
                        name=f"{preset}-lm-int8").ref
        apps = {}
        for label, ref in (("fp32", fp32), ("int8", int8)):
            apps[label] = llmstack.deploy({
                "model": str(ref), "registry": registry.url, "app_name": f"{preset}-{label}",
                "http": {"port": port, "route_prefix": f"/{preset}-{label}"},
                "engine": {"response_cache_size": 0, "max_batch_size": 8, "max_tokens_limit": args.max_tokens},
                "deployment": {"ray_actor_options": {"num_cpus": 0.5}}})
        for label, app in apps.items():  # warm-up: first-call allocations and kernel selection
            load(app.url, app.config.model, clients=1, requests_each=1, max_tokens=4)
        rows: dict[int, dict[str, list[float]]] = {c: {"fp32": [], "int8": [], "ratio": []} for c in client_counts}
        bar = tqdm(total=args.rounds * len(client_counts) * 2, desc=f"{preset}: rounds", unit="run")
        for round_index in range(args.rounds):
            order = ["fp32", "int8"] if round_index % 2 == 0 else ["int8", "fp32"]
            for clients in client_counts:
                measured = {}
                for label in order:
                    app = apps[label]
                    measured[label] = load(app.url, app.config.model, clients=clients,
                                           requests_each=args.requests_each, max_tokens=args.max_tokens)
                    bar.update()
                rows[clients]["fp32"].append(measured["fp32"]["tokens_per_s"])
                rows[clients]["int8"].append(measured["int8"]["tokens_per_s"])
                rows[clients]["ratio"].append(measured["int8"]["tokens_per_s"] / measured["fp32"]["tokens_per_s"])
        bar.close()
        for app in apps.values():
            app.shutdown()
        results["presets"][preset] = {"parameters": params, "rows": {str(c): v for c, v in rows.items()}}
        print(json.dumps({preset: {c: round(statistics.median(v["ratio"]), 3) for c, v in rows.items()}}), flush=True)
    ray.shutdown()
    results["wall_s"] = time.time() - t_begin
    write_json("quantized_serve", results)

    lines = ["## quantized serving", "",
             f"Reproduce: `python benchmarks/quantized_serve_bench.py` ({results['wall_s'] / 60:.1f} min on "
             f"{cpu_name()}, 2 cores shared with other jobs; torch {torch.__version__}, "
             f"quantized engine `{torch.backends.quantized.engine}`, python {platform.python_version()}). "
             "Random-init presets with a 4096-token BPE vocabulary; the int8 version is `quantize(ref, "
             "\"int8-dynamic\")` (torchao int8 decoder linears but the first and last layer's; `lm_head` and "
             "embeddings stay float). Both are served by `llmstack.deploy()` as shipped (one replica each, "
             "default torch threads, response cache off, "
             f"max_batch_size 8), side by side on one Ray cluster; {args.requests_each} greedy completions of "
             f"{args.max_tokens} tokens per client, closed loop. Medians over {args.rounds} rounds that alternate "
             "which app goes first; each ratio is taken within its round. Raw numbers: "
             "`benchmarks/results/quantized_serve.json`.", ""]
    lines += markdown_table(
        ["preset", "parameters", "clients", "fp32 tok/s", "int8 tok/s", "int8 / fp32", "per-round ratios"],
        [[preset, f"{data['parameters'] / 1e6:.0f}M", clients, f"{statistics.median(v['fp32']):.1f}",
          f"{statistics.median(v['int8']):.1f}", f"**{statistics.median(v['ratio']):.2f}x**",
          ", ".join(f"{r:.2f}" for r in v["ratio"])]
         for preset, data in results["presets"].items() for clients, v in data["rows"].items()], align="lrrrrrl")
    met = all(statistics.median(v["ratio"]) > 1.0 for d in results["presets"].values() for v in d["rows"].values())
    lines += ["", f"Target (issue #13: int8 decodes faster than fp32 through deploy() on small and base): "
              f"{'met' if met else 'not met'} in this run."]
    write_section("quantized serving", "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
