"""Prefix cache and long-decode benchmark: the engine in process (no HTTP), measured side by side in one run.

1. time to first token for requests that share a 256-token prefix (each with its own 16-token tail),
   prefix cache on vs off, requests interleaved on one engine;
2. decode tokens/s at 512 vs 32 generated tokens (batch 1 and batch 8), with the engine's in-place KV
   cache and, for comparison, transformers' stock concatenating ``DynamicCache``.

Writes benchmarks/results/prefix.json and the ``## prefix cache and long decode`` section of RESULTS.md.

Reproduce: python benchmarks/prefix_bench.py            (about 3 minutes on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import statistics
import sys
import time
from typing import Any

from harness import cpu_name, logger, write_json, write_section

SECTION = "prefix cache and long decode"
log = logger("prefix-bench")


def build_engine(preset: str) -> Any:
    import torch

    from llmstack.serve._testing import tiny_model
    from llmstack.serve.engine import ServedModel, TransformersEngine

    torch.set_num_threads(1)  # what a replica gets by default on this machine
    model, tokenizer = tiny_model(seed=0, max_seq_len=1024, preset=preset)
    return TransformersEngine(ServedModel(model, tokenizer, "bench", "bench@v1", f"bench::{preset}"),
                              max_tokens_limit=512, cache_size=0, prefix_cache_mb=64)


def request(prompt: list[int], max_tokens: int) -> Any:
    from llmstack.serve.protocol import GenerationRequest, SamplingParams

    return GenerationRequest(model="bench", prompt=prompt,
                             sampling=SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))


def timed(engine: Any, requests: list[Any]) -> tuple[list[Any], float, float]:
    """Results, wall seconds and process CPU seconds of decoding ``requests`` as one batch."""
    wall, cpu = time.perf_counter(), time.process_time()
    results = asyncio.run(engine.generate_batch(requests))
    return results, time.perf_counter() - wall, time.process_time() - cpu


def ttft_shared_prefix(engine: Any, rounds: int) -> dict[str, Any]:
    """TTFT of 272-token prompts sharing their first 256 tokens, cache on vs off, interleaved (medians).

    Wall TTFT is the engine's (arrival to first token); the CPU figure is the process CPU time of a
    one-token request, which the other load on a shared machine does not inflate.
    """
    rng = random.Random(0)
    prefix = [rng.randrange(3, 300) for _ in range(256)]
    prompts = [prefix + [rng.randrange(3, 300) for _ in range(16)] for _ in range(2 * rounds + 1)]
    store = engine.prefix_cache
    timed(engine, [request(prompts[0], 1)])  # warms the model and puts the prefix in the cache
    wall: dict[str, list[float]] = {"off": [], "on": []}
    cpu: dict[str, list[float]] = {"off": [], "on": []}
    hit_tokens, same = [], True
    for i in range(rounds):
        for mode, prompt in (("off", prompts[1 + 2 * i]), ("on", prompts[2 + 2 * i])):
            engine.prefix_cache = store if mode == "on" else None
            (result,), _, seconds = timed(engine, [request(prompt, 1)])
            wall[mode].append(result.timing.ttft_s)
            cpu[mode].append(seconds)
            if mode == "on":
                hit_tokens.append(result.prefix_cached_tokens)
        # The reused prompt decoded again without the cache must give the same greedy tokens.
        engine.prefix_cache = None
        (plain,), _, _ = timed(engine, [request(prompts[2 + 2 * i], 8)])
        engine.prefix_cache = store
        (reused,), _, _ = timed(engine, [request(prompts[2 + 2 * i], 8)])
        same = same and plain.choices[0].token_ids == reused.choices[0].token_ids
    med = {k: {m: 1000 * statistics.median(v[m]) for m in v} for k, v in (("wall", wall), ("cpu", cpu))}
    return {"prompt_tokens": len(prompts[0]), "shared_prefix_tokens": len(prefix), "rounds": rounds,
            "ttft_ms": med, "speedup_wall": med["wall"]["off"] / med["wall"]["on"],
            "speedup_cpu": med["cpu"]["off"] / med["cpu"]["on"],
            "hit_tokens_median": statistics.median(hit_tokens), "greedy_ids_equal": same}


def long_decode(engine: Any, repeats: int) -> list[dict[str, Any]]:
    """Generated tokens/s at 32 and 512 tokens per row, runs of the two lengths alternating (medians)."""
    own_cache = engine.new_cache
    out = []
    for label, new_cache in (("in-place (engine)", own_cache), ("stock DynamicCache", lambda: None)):
        engine.new_cache = new_cache  # None: the model builds transformers' own cache, which concatenates
        for rows in (1, 8):
            rates: dict[int, dict[str, list[float]]] = {n: {"wall": [], "cpu": []} for n in (32, 512)}
            timed(engine, [request([5, 17, 33, 71], 8)])  # warm-up
            for r in range(repeats):
                for n in (32, 512):
                    prompts = [[5 + r, 17 + j, 33, 71] for j in range(rows)]
                    results, wall, cpu = timed(engine, [request(p, n) for p in prompts])
                    tokens = sum(res.completion_tokens for res in results)
                    rates[n]["wall"].append(tokens / wall)
                    rates[n]["cpu"].append(tokens / cpu)
            row = {"kv_cache": label, "rows": rows}
            for clock in ("wall", "cpu"):
                short, long = (statistics.median(rates[n][clock]) for n in (32, 512))
                row.update({f"{clock}_tok_s_32": short, f"{clock}_tok_s_512": long, f"{clock}_ratio": long / short})
            out.append(row)
            log(f"{label} rows={rows}: cpu {row['cpu_tok_s_32']:.0f} -> {row['cpu_tok_s_512']:.0f} tok/s "
                f"({row['cpu_ratio']:.2f}), wall ratio {row['wall_ratio']:.2f}")
    engine.new_cache = own_cache
    return out


def attention_share(engine: Any, rows: int = 8) -> dict[str, float]:
    """Share of a decode step's CPU time spent in attention, early (about 32 tokens in) and late (about 512)."""
    from torch.profiler import profile

    from llmstack.serve.engine.batch import Batch

    works = [engine.prepare(request([5, 17 + j, 33, 71], 512)) for j in range(rows)]
    shares = {}

    def run() -> None:
        batch = Batch(engine, None, works)
        batch.prefill()
        for length in (32, 512):
            while batch.mask.shape[1] < length - 5:
                batch.step()
            with profile() as prof:
                for _ in range(5):
                    batch.step()
            ops = prof.key_averages()
            total = sum(op.self_cpu_time_total for op in ops)
            attention = sum(op.self_cpu_time_total for op in ops if "attention" in op.key)
            shares[f"at_{length}"] = attention / total

    run()
    return shares


def markdown(r: dict[str, Any]) -> str:
    t = r["ttft"]
    ms = t["ttft_ms"]
    lines = [f"## {SECTION}", "",
             f"Machine: {r['machine']['cpu']}, {r['machine']['cores']} cores shared with other jobs (load average "
             f"{r['machine']['load']}), torch threads 1, Python {r['machine']['python']}. Model: `{r['preset']}` "
             "preset (random init), float32, CPU; the engine in process (no HTTP), greedy. On this shared "
             "machine wall times are noisy, so every figure also comes as process CPU time.", "",
             "Reproduce: `PYTHONPATH=src python benchmarks/prefix_bench.py" + (" --quick" if r["quick"] else "")
             + "` (writes benchmarks/results/prefix.json)", "",
             f"**Time to first token**, {t['prompt_tokens']}-token prompts sharing their first "
             f"{t['shared_prefix_tokens']} tokens, each with its own tail; median of {t['rounds']} requests each "
             "way, interleaved:", "",
             "| prefix cache | TTFT wall (ms) | CPU per 1-token request (ms) |", "|---|---:|---:|",
             f"| off | {ms['wall']['off']:.1f} | {ms['cpu']['off']:.1f} |",
             f"| on ({t['hit_tokens_median']:.0f} tokens reused) | {ms['wall']['on']:.1f} | {ms['cpu']['on']:.1f} |",
             "",
             f"Speed-up: **{t['speedup_wall']:.1f}x** wall, **{t['speedup_cpu']:.1f}x** CPU (target >= 3x: "
             f"{'met' if min(t['speedup_wall'], t['speedup_cpu']) >= 3 else 'NOT met'}). Greedy ids with and "
             f"without reuse equal: {t['greedy_ids_equal']}.", "",
             f"**Decode tokens/s at 512 vs 32 generated tokens** per row (median of {r['repeats']} alternating "
             "runs):", "",
             "| KV cache | rows | CPU tok/s at 32 | at 512 | 512 / 32 | wall 512 / 32 |",
             "|---|---:|---:|---:|---:|---:|"]
    for d in r["decode"]:
        lines.append(f"| {d['kv_cache']} | {d['rows']} | {d['cpu_tok_s_32']:.0f} | {d['cpu_tok_s_512']:.0f} | "
                     f"{d['cpu_ratio']:.2f} | {d['wall_ratio']:.2f} |")
    worst = min(d["cpu_ratio"] for d in r["decode"] if d["kv_cache"].startswith("in-place"))
    share = r["attention_share"]
    lines += ["", f"Target: tokens/s at 512 within 15% of tokens/s at 32 (ratio >= 0.85): worst in-place CPU ratio "
                  f"{worst:.2f}, {'met' if worst >= 0.85 else 'NOT met'}. Both KV caches in the table detokenize "
                  "incrementally; the stock cache also copies every layer's whole KV cache at each step. "
                  "What still grows with length is attention itself, which reads every cached token at each "
                  f"step: profiled at 8 rows, it is {100 * share['at_32']:.0f}% of a decode step's CPU time "
                  f"about 32 tokens in and {100 * share['at_512']:.0f}% about 512 tokens in.", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--quick", action="store_true", help="fewer repeats (smoke run)")
    args = parser.parse_args()
    repeats, rounds = (1, 3) if args.quick else (3, 9)
    engine = build_engine(args.preset)
    log(f"{args.preset}: time to first token, shared 256-token prefix, {rounds} rounds")
    ttft = ttft_shared_prefix(engine, rounds)
    log(f"ttft {ttft['ttft_ms']}: {ttft['speedup_wall']:.1f}x wall, {ttft['speedup_cpu']:.1f}x cpu")
    decode = long_decode(engine, repeats)
    share = attention_share(engine)
    log(f"attention share of a step: {share}")
    engine.shutdown()
    result = {"preset": args.preset, "quick": args.quick, "repeats": repeats, "ttft": ttft, "decode": decode,
              "attention_share": share,
              "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                          "load": " ".join(f"{x:.1f}" for x in os.getloadavg())}}
    write_json("prefix", result, indent=2)
    write_section(SECTION, markdown(result))
    log("wrote benchmarks/results/prefix.json and RESULTS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
