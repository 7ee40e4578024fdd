"""How sensitive is the release gate, and what does it cost?

Trains one tiny baseline in-process, then validates perturbed copies against it in one run:
weight noise of growing size, per-channel int8 and int4 fake quantization, and forward passes
slowed by a fixed sleep. Records each check's numbers and the verdict, plus validate() wall time.

    .venv/bin/python benchmarks/validate_bench.py            # writes benchmarks/results/validate.json + .png

With ``--model DIR`` (a Hugging Face causal LM directory, e.g. SmolLM2-135M-Instruct) it shows the gate on
real weights instead: the float model against its weights rounded to bf16 and back
(near-lossless, same kernels), and against quantized versions made by ``llmstack.quantize`` (w8a8, nf4, fp4);
each row has the held-out perplexity ratio, the verdict and the failed checks' reasons.

    .venv/bin/python benchmarks/validate_bench.py --model ~/.cache/llmstack/models/SmolLM2-135M-Instruct
        # writes benchmarks/results/validate_real.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path
from typing import Any

from harness import RESULTS_DIR as RESULTS
from harness import write_json
from harness.plots import pyplot

# Smaller samples than the defaults so the whole sweep fits a few minutes on a busy 2-core machine.
THRESHOLDS = {"latency_requests": 16, "generation_tokens": 8}
# The real-model run is about quality; a smaller latency sample keeps a 135M model's sweep within minutes.
REAL_THRESHOLDS = {**THRESHOLDS, "latency_requests": 8, "latency_repeats": 1, "latency_warmup": 1}


def train_tiny(tokenizer: Any, texts: list[str], *, steps: int = 60, seed: int = 0) -> Any:
    import torch

    from llmstack.models import build_model

    torch.manual_seed(seed)
    stream: list[int] = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    n = len(stream) // 64
    data = torch.tensor(stream[: n * 64]).view(n, 64)
    model = build_model("tiny", vocab_size=len(tokenizer), max_seq_len=256, seed=seed, tokenizer=tokenizer)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, n, (8,), generator=gen)
        loss = model(input_ids=data[idx], labels=data[idx]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def fake_quant(model: Any, bits: int) -> Any:
    import torch

    quant, levels = copy.deepcopy(model), 2 ** (bits - 1) - 1
    with torch.no_grad():
        for module in quant.modules():
            if isinstance(module, torch.nn.Linear):
                w = module.weight
                scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-8) / levels
                w.copy_((w / scale).round().clamp(-levels, levels) * scale)
    return quant


def noised(model: Any, scale: float) -> Any:
    import torch

    bad, gen = copy.deepcopy(model), torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in bad.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * p.std().clamp_min(1e-3) * scale)
    return bad


def slowed(model: Any, seconds: float) -> Any:
    slow = copy.deepcopy(model)
    if seconds > 0:
        slow.register_forward_hook(lambda *_: time.sleep(seconds))
    return slow


def bf16_rounded(model: Any) -> Any:
    """``model`` with every weight rounded to bfloat16 and back: a near-lossless change on the same kernels."""
    import torch

    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for param in rounded.parameters():
            param.copy_(param.to(torch.bfloat16).to(param.dtype))
    return rounded


def real_model(directory: str, methods: list[str]) -> None:
    """The gate on a real model: near-lossless candidates should pass, a degraded quantization should not."""
    import tempfile

    import torch

    from llmstack.data import load_corpus
    from llmstack.models import load_artifact
    from llmstack.quantize import quantize
    from llmstack.registry import Registry
    from llmstack.validate import DEFAULT_PROBES, ValidateConfig, validate

    torch.set_num_threads(2)
    probes = list(DEFAULT_PROBES[:12])
    held_out = load_corpus("builtin:stdlib", max_documents=200).documents[120:]  # text the gate scores
    base = load_artifact(directory, dtype="float32")
    baseline = (base.model, base.tokenizer)
    cases: list[tuple[str, Any]] = [("weights rounded to bf16", bf16_rounded(base.model))]
    rows = []
    with tempfile.TemporaryDirectory(prefix="validate-real-") as tmp:
        registry = Registry(str(Path(tmp) / "registry"))
        for method in methods:
            started = time.perf_counter()
            result = quantize({"evaluation": {"enabled": False}}, source=directory, method=method, registry=registry)
            print(f"quantized {method} in {time.perf_counter() - started:.0f}s: {result.ref}", flush=True)
            cases.append((f"quantize {method}", load_artifact(str(result.ref), registry=registry).model))
        for label, candidate in cases:
            start = time.perf_counter()
            report = validate(REAL_THRESHOLDS, candidate=(candidate, base.tokenizer), baseline=baseline,
                              eval_data=held_out, probes=probes, progress=False, store=False)
            seconds = time.perf_counter() - start
            checks = {c.name: c for c in report.checks}
            ppl = checks["perplexity"].metrics
            rows.append({"case": label, "passed": report.passed, "failed": report.failed_checks,
                         "perplexity_ratio": round(ppl["candidate_perplexity"] / ppl["baseline_perplexity"], 4),
                         "reasons": {c.name: c.detail for c in report.checks if not c.passed},
                         "seconds": round(seconds, 1), "checks": {c.name: c.metrics for c in report.checks}})
            print(real_table(rows[-1:]), flush=True)
            data = {"model": str(directory), "held_out": "builtin:stdlib documents 120-199",
                    "machine": {"python": platform.python_version(), "torch": torch.__version__,
                                "cpu_threads": torch.get_num_threads()},
                    "thresholds": {**ValidateConfig().__dict__, **REAL_THRESHOLDS}, "probes": len(probes),
                    "rows": rows}
            write_json("validate_real", data, indent=2, default=str)  # after every case: a cut-short run keeps its rows
    print(real_table(rows))


def real_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| candidate | held-out ppl ratio | ppl change 95% CI high | verdict | failed checks: reason |",
             "|---|---:|---:|---|---|"]
    for r in rows:
        reasons = "; ".join(f"{name}: {detail}" for name, detail in r["reasons"].items()) or "-"
        lines.append(f"| {r['case']} | x{r['perplexity_ratio']:.4f} | {r['checks']['perplexity']['ci_high']:+.2%} | "
                     f"{'PASS' if r['passed'] else 'FAIL'} | {reasons} |")
    return "\n".join(lines)


def main() -> None:
    import torch
    from tqdm import tqdm

    from llmstack.data import load_corpus, trained_tokenizer
    from llmstack.validate import DEFAULT_PROBES, ValidateConfig, validate

    probes = list(DEFAULT_PROBES[:12])

    torch.set_num_threads(1)
    corpus = load_corpus("builtin:stdlib", max_documents=140)
    tokenizer = trained_tokenizer(corpus, vocab_size=512)
    base = train_tiny(tokenizer, corpus.documents[:120])
    held_out = corpus.documents[120:]
    cases: list[tuple[str, str, float, Any]] = [("identical", "identical", 0.0, copy.deepcopy(base))]
    cases += [("noise", f"noise x{s}", s, noised(base, s)) for s in (0.01, 0.03, 0.1, 0.3, 1.0)]
    cases += [("quant", f"int{b} per-channel", float(b), fake_quant(base, b)) for b in (8, 4, 3)]
    cases += [("slow", f"+{ms} ms/forward", ms, slowed(base, ms / 1000)) for ms in (2.0, 10.0)]
    rows = []
    for family, label, level, candidate in tqdm(cases, desc="validate bench"):
        start = time.perf_counter()
        report = validate(THRESHOLDS, candidate=(candidate, tokenizer), baseline=(base, tokenizer),
                          eval_data=held_out, probes=probes, progress=False)
        seconds = time.perf_counter() - start
        rows.append({"family": family, "case": label, "level": level, "passed": report.passed,
                     "failed": report.failed_checks, "seconds": round(seconds, 2),
                     "checks": {c.name: c.metrics for c in report.checks}})
    data = {"machine": {"python": platform.python_version(), "torch": torch.__version__,
                        "cpu_threads": torch.get_num_threads()},
            "thresholds": {**ValidateConfig().__dict__, **THRESHOLDS}, "probes": len(probes), "rows": rows}
    write_json("validate", data, indent=2, default=str)
    plot(rows)
    print(table(rows))


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| candidate | verdict | failed checks | mean KL | top-1 agree | ppl change (95% CI high) "
             "| p50 latency ratio | p95 latency ratio | MW p | validate s |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        d, p, lat = r["checks"]["distribution"], r["checks"]["perplexity"], r["checks"]["latency"]
        lines.append(f"| {r['case']} | {'PASS' if r['passed'] else 'FAIL'} | {', '.join(r['failed']) or '-'} | "
                     f"{d['mean_kl']:.2e} | {d['top1_agreement']:.3f} | {p['relative_change']:+.2%} "
                     f"({p['ci_high']:+.2%}) | {lat['p50_ratio']:.2f} | {lat['p95_ratio']:.2f} | {lat['p_value']:.2g} | {r['seconds']} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]]) -> None:
    plt = pyplot()
    noise = [r for r in rows if r["family"] == "noise"]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    xs = [r["level"] for r in noise]
    ax[0].loglog(xs, [max(r["checks"]["distribution"]["mean_kl"], 1e-12) for r in noise], "o-", label="mean KL")
    ax[0].axhline(0.05, color="red", ls="--", label="gate: max mean KL")
    ax[0].set_xlabel("weight noise (x tensor std)")
    ax[0].set_ylabel("nats")
    ax[0].legend()
    ax[0].set_title("distribution shift vs weight noise")
    slow = [r for r in rows if r["family"] == "slow"]
    levels = [0.0] + [r["level"] for r in slow]  # the identical copy is the 0 ms point
    slow = [rows[0]] + slow
    ax[1].plot(levels, [r["checks"]["latency"]["p50_ratio"] for r in slow], "o-", label="p50 ratio")
    ax[1].plot(levels, [r["checks"]["latency"]["p95_ratio"] for r in slow], "s-", label="p95 ratio")
    ax[1].axhline(1.5, color="red", ls="--", label="gate: max ratio (if Mann-Whitney p < 0.01)")
    ax[1].set_xlabel("added sleep per forward (ms)")
    ax[1].set_ylabel("latency ratio (candidate / baseline)")
    ax[1].legend()
    ax[1].set_title("latency check")
    fig.tight_layout()
    fig.savefig(RESULTS / "validate.png", dpi=100)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a Hugging Face causal LM directory: the gate on real weights")
    parser.add_argument("--methods", default="w8a8,nf4,fp4", help="--model: llmstack.quantize methods to gate")
    parser.add_argument("--plot-only", action="store_true", help="redraw the plot and table from the last results")
    args = parser.parse_args()
    if args.model:
        real_model(args.model, [m for m in args.methods.split(",") if m])
    elif args.plot_only:  # redraw from the last results
        plot(json.loads((RESULTS / "validate.json").read_text())["rows"])
        print(table(json.loads((RESULTS / "validate.json").read_text())["rows"]))
    else:
        main()
