"""The quickstart: the whole lifecycle on the embedded default, offline, on a CPU.

Each stage takes a registry reference and returns a new one, so the closing summary is also the
lineage of what was built. Later stages are added as the library grows.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm


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


def _stage_model(ctx: QuickstartContext) -> str:
    from llmstack.models import build_model, count_parameters, load_tokenizer, register_model

    tokenizer = load_tokenizer(ctx.refs["tokenizer"], registry=ctx.registry)
    model = build_model("tiny", vocab_size=len(tokenizer), tokenizer=tokenizer, seed=0)
    ref = register_model(ctx.registry, "tiny-lm-init", model, tokenizer, parents=[ctx.refs["tokenizer"]],
                         config={"preset": "tiny", "seed": 0},
                         metrics={"parameters": count_parameters(model)})
    ctx.refs["init"] = str(ref)
    return f"tiny preset, {count_parameters(model) / 1e6:.2f}M parameters -> {ref}"


STAGES: list[tuple[str, Callable[[QuickstartContext], str]]] = [
    ("corpus + tokenizer", _stage_tokenizer),
    ("tiny model", _stage_model),
]


def run_quickstart(*, registry: str | None = None, workdir: str | Path | None = None) -> QuickstartContext:
    """Run every stage in order, printing progress and a closing summary.

    Example:
        >>> ctx = run_quickstart(registry="memory://quickstart")  # doctest: +SKIP
    """
    from llmstack.registry import Registry

    ctx = QuickstartContext(registry=Registry(registry), workdir=Path(workdir or "runs/quickstart").resolve())
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
