"""The quickstart: the whole lifecycle on the embedded default, offline, on a CPU.

Each stage takes a registry reference and returns a new one, so the closing summary is also the
lineage of what was built. Later stages are added as the library grows.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from llmstack.errors import ConfigError


SERVED_NAME = "tiny-lm"  # what serve_configs/tiny.yaml serves: tiny-lm@production


@dataclass
class StageResult:
    name: str
    seconds: float
    summary: str
    refs: dict[str, str] = field(default_factory=dict)


@dataclass
class QuickstartContext:
    registry: Any
    workdir: Path
    run_id: str = field(default_factory=lambda: time.strftime("%Y%m%d-%H%M%S"))
    pretrain_steps: int = 300
    finetune_steps: int = 120
    port: int = 8000
    method: str = "int8-weight-only"  # stage 4's quantization method
    refs: dict[str, str] = field(default_factory=dict)
    results: list[StageResult] = field(default_factory=list)


def _stage_tokenizer(ctx: QuickstartContext) -> str:
    from llmstack.data import load_corpus, train_tokenizer

    corpus = load_corpus("builtin:stdlib")
    tokenizer = train_tokenizer(corpus.documents, vocab_size=4096)
    directory = ctx.workdir / "tokenizer"
    tokenizer.save_pretrained(str(directory))
    ref = ctx.registry.register("stdlib-bpe", directory, kind="tokenizer", data_fingerprint=corpus.fingerprint,
                                config={"vocab_size": len(tokenizer), "corpus": corpus.name},
                                metrics={"documents": len(corpus.documents)})
    ctx.refs["tokenizer"] = str(ref)
    return f"{len(corpus.documents)} documents (fingerprint {corpus.fingerprint[:12]}), vocab {len(tokenizer)} -> {ref}"


def _stage_pretrain(ctx: QuickstartContext) -> str:
    from llmstack.config import DataConfig, WorkersConfig, TrainConfig, LoopConfig
    from llmstack.train import train

    config = TrainConfig(
        name="tiny-lm-base", storage_path=str(ctx.workdir / "checkpoints" / ctx.run_id),
        data=DataConfig(source="builtin:stdlib", tokenizer=ctx.refs["tokenizer"], block_size=128),
        training=LoopConfig(max_steps=ctx.pretrain_steps, micro_batch_size=8, learning_rate=3e-3,
                                warmup_steps=20, eval_every=50, checkpoint_every=100),
        scaling=WorkersConfig(num_workers=2, strategy="ddp"))
    result = train(config, registry=ctx.registry)
    ctx.refs["pretrained"] = str(result.ref)
    first = result.history[0]["loss"] if result.history else float("nan")
    return (f"loss {first:.2f} -> {result.metrics['loss']:.2f}, eval perplexity "
            f"{result.metrics.get('perplexity', float('nan')):.1f} -> {result.ref} (loss curve in {result.run_dir})")


def _stage_finetune(ctx: QuickstartContext) -> str:
    from llmstack.finetune import finetune_lora, merge_adapter

    result = finetune_lora({
        "name": "tiny-lm-lora", "base": ctx.refs["pretrained"],
        "storage_path": str(ctx.workdir / "checkpoints" / ctx.run_id),
        "lora": {"method": "lora", "rank": 8, "alpha": 16},
        "training": {"max_steps": ctx.finetune_steps, "micro_batch_size": 8, "learning_rate": 2e-3,
                     "warmup_steps": 10, "eval_every": 40, "checkpoint_every": 0},
        "scaling": {"num_workers": 2}}, registry=ctx.registry)
    ctx.refs["adapter"] = str(result.ref)
    # The merged model is the first release candidate of `tiny-lm`, the name that gets served.
    ctx.refs["merged"] = str(merge_adapter(ctx.registry, result.ref, name=SERVED_NAME))
    m = result.metrics
    return (f"held-out answer loss {m['eval_loss_before']:.2f} -> {m['eval_loss']:.2f}, "
            f"{100 * m['trainable_fraction']:.1f}% of weights trained -> {result.ref}, merged {ctx.refs['merged']}")


def _stage_quantize(ctx: QuickstartContext) -> str:
    from llmstack.quantize import quantize

    # Dynamic int8 (int8 weights, per-call activation scales) keeps decode latency closest to fp32 on a
    # model this small, where SmoothQuant's per-token quantization costs more than its int8 matmuls save.
    result = quantize(source=ctx.refs["merged"], method=ctx.method, registry=ctx.registry, name=SERVED_NAME)
    ctx.refs["quantized"] = str(result.ref)
    tqdm.write(result.table())
    m = result.metrics
    return (f"{ctx.method}: perplexity x{m['perplexity_ratio']:.3f}, bytes x{m['model_bytes_ratio']:.2f}, "
            f"decode x{m['decode_tokens_per_s_ratio']:.2f} -> {result.ref}")


def _stage_gate(ctx: QuickstartContext) -> str:
    from llmstack.validate import validate

    registry = ctx.registry
    production = f"{SERVED_NAME}@production"
    # The fine-tuned model is the baseline the quantized candidate must match. On a first run it
    # becomes production directly; on a re-run it replaces the previous holder, recorded as forced.
    holder = registry.aliases(SERVED_NAME).get("production")
    registry.promote(ctx.refs["merged"], alias="production", force=holder is not None,
                     reason="quickstart: fine-tuned model is the baseline")
    report = validate(candidate=ctx.refs["quantized"], baseline=production, registry=registry)
    tqdm.write(report.to_text())
    if not report.passed:
        # The gate doing its job: a candidate slower or less faithful than production is not released.
        return (f"gate refused {ctx.refs['quantized']} ({', '.join(report.failed_checks)}); "
                f"{production} stays the fp32 {ctx.refs['merged']}")
    registry.promote(ctx.refs["quantized"], alias="production", reason=f"quickstart: {ctx.method} passed the gate")
    ctx.refs["production"] = production
    return f"gate passed against {ctx.refs['merged']}; {production} -> {ctx.refs['quantized']}"


def _stage_serve(ctx: QuickstartContext) -> str:
    import json
    import urllib.request

    from llmstack.serve import deploy

    served = f"{SERVED_NAME}@production"
    with deploy({"model": served, "registry": ctx.registry.url, "http": {"port": ctx.port},
                 "app_name": "quickstart"}) as app:
        latencies = []
        for question in ("What does json.dumps do?", "What does os.path.join do?"):
            body = {"model": served, "messages": [{"role": "user", "content": question}], "max_tokens": 24,
                    "temperature": 0}
            started = time.perf_counter()
            request = urllib.request.Request(app.url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=120) as response:
                answer = json.load(response)["choices"][0]["message"]["content"]
            latencies.append(time.perf_counter() - started)
            tqdm.write(f"  Q: {question}\n  A: {answer.strip()!r}  ({latencies[-1] * 1000:.0f} ms)")
        body = {"model": served, "prompt": "def parse(", "max_tokens": 16, "stream": True, "temperature": 0}
        request = urllib.request.Request(app.url + "/v1/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        chunks = []
        with urllib.request.urlopen(request, timeout=120) as response:
            for line in response:
                line = line.decode().strip()
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunks.append(json.loads(line[6:])["choices"][0].get("text", ""))
        tqdm.write(f"  streamed {len(chunks)} chunks: {'def parse(' + ''.join(chunks)!r}")
    return f"served {served} at {app.url}: 2 chat answers (median {statistics.median(latencies) * 1000:.0f} ms), 1 stream"


STAGES: list[tuple[str, Callable[[QuickstartContext], str]]] = [
    ("corpus + tokenizer", _stage_tokenizer),
    ("pretrain (Ray Train)", _stage_pretrain),
    ("fine-tune (LoRA)", _stage_finetune),
    ("quantize (int8)", _stage_quantize),
    ("validate + promote", _stage_gate),
    ("serve (Ray Serve)", _stage_serve),
]


def run_quickstart(*, registry: str | None = None, workdir: str | Path | None = None,
                   method: str = "int8-weight-only") -> QuickstartContext:
    """Run every stage in order, printing progress and a closing summary.

    Example:
        >>> ctx = run_quickstart(registry="memory://quickstart")  # doctest: +SKIP
    """
    from llmstack.registry import Registry

    from llmstack.quantize import known_methods

    if method not in known_methods():  # before any stage runs, not after minutes of training
        raise ConfigError(f"method: unknown quantization method {method!r}; "
                          f"choose one of {', '.join(known_methods())}")
    ctx = QuickstartContext(registry=Registry(registry), workdir=Path(workdir or "runs/quickstart").resolve(),
                            method=method)
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    bar = tqdm(STAGES, desc="quickstart", unit="stage")
    for name, stage in bar:
        bar.set_postfix_str(name)
        started = time.perf_counter()
        summary = stage(ctx)
        ctx.results.append(StageResult(name, time.perf_counter() - started, summary, dict(ctx.refs)))
        tqdm.write(f"[{name}] {summary}")
    bar.close()
    print(format_summary(ctx))
    return ctx


def format_summary(ctx: QuickstartContext) -> str:
    total = sum(r.seconds for r in ctx.results)
    lines = ["", f"quickstart finished in {total:.0f} s  (registry: {ctx.registry.url})"]
    lines += [f"  {r.name:24s} {r.seconds:6.1f} s  {r.summary}" for r in ctx.results]
    lines += ["", "artifacts:"] + [f"  {k:12s} {v}" for k, v in ctx.refs.items()]
    return "\n".join(lines)
