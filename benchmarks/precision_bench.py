"""Quality guard of bf16 serving (issue #25): greedy bf16 vs fp32 tokens and the gate's perplexity check.

The real model is served twice by the embedded engine, ``engine.dtype: float32`` and ``bfloat16``
(``TransformersEngine.from_source``, the path a replica loads through, ISA check included). Each of
``--prompts`` snippets of the built-in stdlib corpus gets ``--new-tokens`` greedy tokens (end-of-sequence
ignored) from both; reported:

- *position-wise*: share of positions where both chose the same token;
- *to first divergence*: share of tokens before each prompt's first differing token (what a user sees as
  "the same text");
- *same prefix*: share of bf16 choices equal to the fp32 model's choice on the same prefix (teacher
  forcing: a near tie flipped once does not count every later token);

then held-out perplexity of both on the validation gate's own blocks (``llmstack.validate``'s eval split
and scoring, its default ``ValidateConfig``) and the gate's perplexity check of bf16 against fp32.
Target (#25): greedy bf16 == fp32 for >= 95% of tokens and the perplexity check passes.

    nice python benchmarks/precision_bench.py                       # 32 prompts x 64 tokens (~5 min on 2 cores)
    python benchmarks/precision_bench.py --prompts 4 --new-tokens 16 --no-write   # quick look
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from harness import cpu_name, load_average, logger, markdown_table, write_json, write_section

DEFAULT_MODEL = Path("~/.cache/llmstack/models/SmolLM2-135M-Instruct").expanduser()
log = logger("precision-bench")


def prompt_texts(count: int, *, chars: int = 160) -> list[str]:
    """``count`` snippets of the built-in corpus (distinct documents, cut at a line end near ``chars``)."""
    from llmstack.data import load_corpus

    texts = []
    for doc in load_corpus("builtin:stdlib", max_documents=4 * count).documents:
        head = doc[:chars]
        head = head[: head.rfind("\n") + 1] if "\n" in head[chars // 2:] else head
        if len(head.strip()) >= 24:
            texts.append(head)
        if len(texts) == count:
            return texts
    raise RuntimeError(f"the built-in corpus gave only {len(texts)} usable prompts of the {count} asked")


def greedy(engine: Any, prompts: list[str], *, new_tokens: int, batch: int) -> tuple[list[list[int]], list[list[int]]]:
    """Each prompt's ids and its ``new_tokens`` greedy tokens, decoded ``batch`` prompts at a time."""
    from llmstack.serve.protocol import GenerationRequest, SamplingParams

    sampling = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    requests = [GenerationRequest(model=engine.model_id, prompt=p, sampling=sampling) for p in prompts]
    outputs: list[list[int]] = []
    for start in range(0, len(requests), batch):
        results = asyncio.run(engine.generate_batch(requests[start:start + batch]))
        outputs += [r.choices[0].token_ids for r in results]
    return [engine.prepare(r).prompt_ids for r in requests], outputs


def same_prefix_choices(model: Any, prompt_ids: list[int], generated: list[int]) -> list[int]:
    """The model's greedy choice at each step of ``generated`` given the same prefix (one forward pass)."""
    import torch

    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([prompt_ids + generated])).logits[0]  # [T, V]
    return logits[len(prompt_ids) - 1:-1].float().argmax(dim=-1).tolist()


def agreement(fp32_tokens: list[list[int]], bf16_tokens: list[list[int]],
              teacher: list[list[int]]) -> dict[str, Any]:
    total = sum(len(t) for t in fp32_tokens)
    first_divergence = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), min(len(x), len(y)))
                        for x, y in zip(fp32_tokens, bf16_tokens)]
    return {"tokens": total, "prompts": len(fp32_tokens),
            "positionwise": sum(a == b for x, y in zip(fp32_tokens, bf16_tokens) for a, b in zip(x, y)) / total,
            "to_first_divergence": sum(first_divergence) / total,
            "same_prefix": sum(a == b for x, y in zip(bf16_tokens, teacher) for a, b in zip(x, y)) / total,
            "identical_outputs": sum(x == y for x, y in zip(fp32_tokens, bf16_tokens)),
            "first_divergence": first_divergence}


def perplexities(fp32_engine: Any, bf16_engine: Any) -> dict[str, Any]:
    """Both models on the gate's held-out blocks (its default config), and its perplexity check of bf16 vs fp32."""
    import numpy as np
    import torch

    from llmstack.validate._config import ValidateConfig
    from llmstack.validate._validate import _eval_blocks, _perplexity_check, _score_blocks

    cfg = ValidateConfig()
    sides = [SimpleNamespace(model=e.model, manifest=None, label=label)
             for e, label in ((bf16_engine, "bf16"), (fp32_engine, "fp32"))]
    blocks, info = _eval_blocks(None, fp32_engine.tokenizer, sides[0], sides[1], cfg)
    with torch.inference_mode():  # as the gate scores
        start = time.perf_counter()
        fp32_nll, _, fp32_finite = _score_blocks(fp32_engine.model, blocks)
        fp32_s = time.perf_counter() - start
        start = time.perf_counter()
        bf16_nll, _, bf16_finite = _score_blocks(bf16_engine.model, blocks)
        bf16_s = time.perf_counter() - start
    check = _perplexity_check(fp32_nll, bf16_nll, cfg)
    return {"blocks": list(blocks.shape), **info, "fp32_perplexity": float(np.exp(fp32_nll.mean())),
            "bf16_perplexity": float(np.exp(bf16_nll.mean())), "finite": fp32_finite and bf16_finite,
            "gate_check": {"passed": bool(check.passed), "detail": check.detail, **check.metrics,
                           "thresholds": check.thresholds},
            "scoring_s": {"fp32": round(fp32_s, 1), "bf16": round(bf16_s, 1)}}


def section(result: dict[str, Any]) -> str:
    agree, ppl = result["agreement"], result["perplexity"]
    gate = ppl["gate_check"]
    rows = [("position-wise equal tokens", f"{agree['positionwise']:.1%}"),
            ("tokens before the first divergence", f"{agree['to_first_divergence']:.1%}"),
            ("bf16 choice == fp32 choice on the same prefix", f"{agree['same_prefix']:.1%}"),
            ("identical outputs", f"{agree['identical_outputs']} / {agree['prompts']}"),
            ("held-out perplexity fp32 / bf16", f"{ppl['fp32_perplexity']:.4g} / {ppl['bf16_perplexity']:.4g}"),
            ("gate perplexity check (bf16 vs fp32)", ("passes" if gate["passed"] else "FAILS") + f": {gate['detail']}")]
    lines = ["## precision (bf16 vs fp32)", "",
             f"{result['model']} served by the embedded engine at `engine.dtype: float32` and `bfloat16` "
             f"(weights and compute in the dtype, logits and sampling fp32; "
             f"{result.get('served_forward', {}).get('bfloat16', 'transformers')} forward, as a replica serves), "
             f"{agree['prompts']} prompts from the "
             f"built-in stdlib corpus x {result['new_tokens']} greedy tokens; perplexity on the validation gate's "
             f"held-out blocks ({ppl['blocks'][0]} x {ppl['blocks'][1]} tokens, {ppl['eval_data']}). "
             f"CPU: {result['cpu']}, torch {result['torch']} ({result['cpu_capability']}), "
             f"{result['threads']} threads, load average {result['load_average']}. Target (#25): >= 95% equal tokens, "
             "the gate's perplexity check passes.", ""]
    lines += markdown_table(["measure", "value"], rows, align="lr")
    flips = round((1 - agree["same_prefix"]) * agree["tokens"])
    met = agree["positionwise"] >= result["target"]["min_equal_tokens"]
    lines += ["", f"On the same prefix bf16 chose another token than fp32 at {flips} of {agree['tokens']} steps (near "
              "ties); each such flip makes the rest of that text differ, which is what the position-wise share "
              f"counts: the >= 95% target is {'met' if met else 'not met'} position-wise, "
              f"{'met' if agree['same_prefix'] >= 0.95 else 'not met'} per choice on the same prefix."]
    lines += ["", f"Reproduce: `nice python benchmarks/precision_bench.py --model {result['model_dir']}` "
              f"(results/precision.json).", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="a float32 HF model directory")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8, help="prompts decoded together")
    parser.add_argument("--no-write", action="store_true", help="print only (no results JSON, no RESULTS.md)")
    args = parser.parse_args()

    import torch

    from llmstack.serve.engine import TransformersEngine
    from llmstack.serve.engine.precision import cpu_capability

    started = time.perf_counter()
    prompts = prompt_texts(args.prompts)
    # greedy tokens as a replica serves them (packed weights, the lean forward); the same-prefix teacher and the
    # gate's perplexity read transformers' forward of the same weights
    engines = {dtype: TransformersEngine.from_source(str(args.model), dtype=dtype, cache_size=0,
                                                     max_tokens_limit=max(512, args.new_tokens),
                                                     prepack_weights=True, lean_forward=True)
               for dtype in ("float32", "bfloat16")}
    references = {dtype: TransformersEngine.from_source(str(args.model), dtype=dtype, cache_size=0)
                  for dtype in ("float32", "bfloat16")}
    try:
        tokens: dict[str, list[list[int]]] = {}
        timings: dict[str, float] = {}
        for dtype, engine in engines.items():
            start = time.perf_counter()
            prompt_ids, tokens[dtype] = greedy(engine, prompts, new_tokens=args.new_tokens, batch=args.batch)
            timings[dtype] = round(time.perf_counter() - start, 1)
            log(f"{dtype}: {len(prompts)} x {args.new_tokens} greedy tokens in {timings[dtype]} s")
        teacher = [same_prefix_choices(references["float32"].model, ids, out)
                   for ids, out in zip(prompt_ids, tokens["bfloat16"])]
        agree = agreement(tokens["float32"], tokens["bfloat16"], teacher)
        log(f"equal tokens: position-wise {agree['positionwise']:.1%}, to first divergence "
            f"{agree['to_first_divergence']:.1%}, same prefix {agree['same_prefix']:.1%}")
        ppl = perplexities(references["float32"], references["bfloat16"])
        log(f"perplexity fp32 {ppl['fp32_perplexity']:.4g}, bf16 {ppl['bf16_perplexity']:.4g}: "
            f"{ppl['gate_check']['detail']}")
    finally:
        for engine in [*engines.values(), *references.values()]:
            engine.shutdown()
    result = {"served_forward": {d: "lean" if e.stats["lean_forward"] else "transformers" for d, e in engines.items()},
              "model": args.model.name, "model_dir": str(args.model), "new_tokens": args.new_tokens,
              "batch": args.batch, "cpu": cpu_name(), "cpu_capability": cpu_capability(), "torch": torch.__version__,
              "python": platform.python_version(), "threads": torch.get_num_threads(),
              "load_average": load_average(), "agreement": agree, "perplexity": ppl, "decode_s": timings,
              "target": {"min_equal_tokens": 0.95, "gate_perplexity_check": True},
              "wall_s": round(time.perf_counter() - started, 1)}
    if args.no_write:
        print(section(result))
        return 0
    path = write_json("precision", result)
    write_section("precision (bf16 vs fp32)", section(result))
    log(f"wrote {path} and RESULTS.md's precision section")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
