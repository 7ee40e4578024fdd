"""Compiled decode step vs eager on a real model, in process (no Ray, no HTTP).

1. ms per decode step, eager vs ``engine.compile`` (torch.compile over KV buckets), batch 1 and 16, fp32 and
   bf16: both engines in one process, rounds interleaved (eager, compiled, eager, ...) on the same prompts,
   each round a prefill then ``--steps`` timed decode steps; the median step per round, the ratio per pair.
2. start-up: a fresh process builds the compiled engine and decodes its first step, with an empty inductor
   cache (cold) and then with the cache the cold run filled (warm): ``compile_seconds`` and the wall time.

Writes benchmarks/results/compile.json and the ``## compiled decode`` section of RESULTS.md.

Reproduce: python benchmarks/compile_bench.py --model /root/.cache/llmstack/models/SmolLM2-135M-Instruct
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import cpu_name, load_average, logger, markdown_table, write_json, write_section

SECTION = "compiled decode"
log = logger("compile-bench")
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
PROMPT_WORDS = "the quick brown fox jumps over the lazy dog while a careful engineer measures every step".split()


def build_engine(model_dir: str, dtype: str, *, compiled: bool, threads: int, freezing: bool = False) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmstack.serve.engine import ServedModel, TransformersEngine

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, DTYPES[dtype]))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return TransformersEngine(ServedModel(model.eval(), tokenizer, "bench", "bench@v1", f"bench::{dtype}"),
                              cache_size=0, max_tokens_limit=512, compile_decode=compiled,
                              compile_freezing=freezing)


def prompts(batch: int) -> list[str]:
    """``batch`` prompts of different lengths (20-40 words), the same every round."""
    return [" ".join(PROMPT_WORDS[(i + j) % len(PROMPT_WORDS)] for j in range(20 + (7 * i) % 21))
            for i in range(batch)]


def batch_of(engine: Any, batch: int, steps: int) -> Any:
    from llmstack.serve.engine.batch import Batch
    from llmstack.serve.protocol import GenerationRequest, SamplingParams

    params = SamplingParams(max_tokens=steps + 2, temperature=0.0, ignore_eos=True)
    works = [engine.prepare(GenerationRequest(model="bench", prompt=p, sampling=params)) for p in prompts(batch)]
    return Batch(engine, None, works)


def step_times(engine: Any, batch: int, steps: int) -> list[float]:
    """A prefill, then ``steps`` decode steps: each step's seconds (engine thread work done inline)."""
    import torch

    with torch.inference_mode():
        work = batch_of(engine, batch, steps)
        work.prefill()
        times = []
        for _ in range(steps):
            started = time.perf_counter()
            work.step()
            times.append(time.perf_counter() - started)
    return times


def measure_steps(model_dir: str, dtype: str, batch: int, steps: int, rounds: int, threads: int,
                  freezing: bool) -> dict[str, Any]:
    eager = build_engine(model_dir, dtype, compiled=False, threads=threads)
    compiled = build_engine(model_dir, dtype, compiled=True, threads=threads, freezing=freezing)
    started = time.perf_counter()
    step_times(compiled, batch, 2)  # compiles (or loads from the cache) outside the timed rounds
    warmup_s = time.perf_counter() - started
    step_times(eager, batch, 2)
    pairs = []
    for r in range(rounds):
        order = (eager, compiled) if r % 2 == 0 else (compiled, eager)
        medians = {id(e): statistics.median(step_times(e, batch, steps)) * 1000 for e in order}
        pairs.append((medians[id(eager)], medians[id(compiled)]))
        log(f"{dtype} batch {batch} round {r}: eager {pairs[-1][0]:.1f} ms, compiled {pairs[-1][1]:.1f} ms")
    stats = compiled.replica_stats()
    eager.shutdown()
    compiled.shutdown()
    return {"dtype": dtype, "batch": batch, "steps": steps, "rounds": rounds, "freezing": freezing,
            "eager_ms": round(statistics.median(p[0] for p in pairs), 2),
            "compiled_ms": round(statistics.median(p[1] for p in pairs), 2),
            "ratio": round(statistics.median(p[0] / p[1] for p in pairs), 3),  # > 1: compiled faster
            "pairs_ms": [[round(a, 2), round(b, 2)] for a, b in pairs],
            "first_steps_s": round(warmup_s, 1), "compiles": stats["compiles"],
            "compile_seconds": stats["compile_seconds"], "compile_fallbacks": stats["compile_fallbacks"]}


def startup_child(model_dir: str, dtype: str, threads: int) -> None:
    """(In a fresh process.) Build the compiled engine, decode one step; print what it took as JSON."""
    started = time.perf_counter()
    engine = build_engine(model_dir, dtype, compiled=True, threads=threads)
    built = time.perf_counter()
    step_times(engine, 1, 1)
    stats = engine.replica_stats()
    print(json.dumps({"build_s": round(built - started, 2), "first_step_s": round(time.perf_counter() - built, 2),
                      "compile_seconds": stats["compile_seconds"], "compiles": stats["compiles"],
                      "compile_fallbacks": stats["compile_fallbacks"]}))


def measure_startup(model_dir: str, dtype: str, threads: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="llmstack-compile-cache-") as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        result: dict[str, Any] = {"dtype": dtype}
        for label in ("cold", "warm"):
            out = subprocess.run([sys.executable, __file__, "--startup-child", "--model", model_dir, "--dtypes", dtype,
                                  "--threads", str(threads)], env=env, capture_output=True, text=True, check=True)
            result[label] = json.loads(out.stdout.strip().splitlines()[-1])
            log(f"start-up {dtype} {label}: {result[label]}")
    return result


def section(results: dict[str, Any], command: str) -> str:
    rows = [[f"{r['dtype']} batch {r['batch']}{' frozen' if r.get('freezing') else ''}", r["eager_ms"], r["compiled_ms"], f"{r['ratio']:.2f}x",
             r["compiles"], r["compile_fallbacks"]] for r in results["steps"]]
    lines = [f"## {SECTION}", "",
             f"`{command}` on {results['cpu']} ({results['threads']} threads, load average {results['load']}): "
             f"{results['model']}, in process. Per row: eager and compiled engines in one process, "
             f"{results['steps'][0]['rounds'] if results['steps'] else 0} interleaved rounds of a prefill and "
             f"{results['steps'][0]['steps'] if results['steps'] else 0} decode steps; the median step per round, "
             "the median over rounds; ratio = eager / compiled per round pair (> 1: compiled faster).", ""]
    lines += markdown_table(["dtype, batch", "eager ms/step", "compiled ms/step", "ratio", "compiles",
                             "fallbacks"], rows)
    if results["startup"]:
        lines += ["", "Start-up of a fresh process (build the compiled engine, decode its first step), inductor "
                  "cache empty (cold) then filled by the cold run (warm):", ""]
        rows = [[s["dtype"], s[k]["build_s"], s[k]["first_step_s"], s[k]["compile_seconds"], k]
                for s in results["startup"] for k in ("cold", "warm")]
        lines += markdown_table(["dtype", "engine build s", "first step s", "compile_seconds", "cache"], rows)
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="/root/.cache/llmstack/models/SmolLM2-135M-Instruct")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--freezing", default="off", choices=("off", "on", "both"),
                        help="inductor freezing (weights folded, prepacked) on the compiled engine")
    parser.add_argument("--startup-dtypes", default="fp32", help="dtypes whose cold/warm start-up is measured")
    parser.add_argument("--startup-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true", help="print, leave RESULTS.md and results/ alone")
    args = parser.parse_args()
    if args.startup_child:
        startup_child(args.model, args.dtypes, args.threads)
        return
    results: dict[str, Any] = {"cpu": cpu_name(), "threads": args.threads, "model": Path(args.model).name,
                               "steps": [], "startup": []}
    for dtype in args.dtypes.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            for freezing in {"off": (False,), "on": (True,), "both": (False, True)}[args.freezing]:
                results["steps"].append(measure_steps(args.model, dtype, batch, args.steps, args.rounds,
                                                      args.threads, freezing))
    for dtype in filter(None, args.startup_dtypes.split(",")):
        results["startup"].append(measure_startup(args.model, dtype, args.threads))
    results["load"] = load_average()
    command = "python benchmarks/compile_bench.py " + " ".join(sys.argv[1:])
    text = section(results, command.strip())
    print(text)
    if not args.no_write:
        write_json("compile", results)
        write_section(SECTION, text)


if __name__ == "__main__":
    main()
