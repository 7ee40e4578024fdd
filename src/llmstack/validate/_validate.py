"""``validate(config, *, candidate, baseline)``: the statistical release gate.

Both models see the same probe prompts and the same held-out blocks. The gate runs five checks:

* ``sanity``: finite logits everywhere, no (more) empty generations than the baseline.
* ``distribution``: per-position next-token distributions on the probes: mean KL, mean JS, top-1
  agreement.
* ``loglik_shift``: two-sample Kolmogorov-Smirnov test on per-token log-likelihoods of held-out text.
  Tokens within a block are not independent, so the p-value is approximate; the gate therefore
  also requires an effect size (the KS distance) before it calls a shift a failure.
* ``perplexity``: held-out perplexity of both, and a paired bootstrap (over blocks) confidence
  interval of the relative change; fails when the interval's upper end exceeds the tolerance.
* ``latency``: per-request generation latency, interleaved between the two models so machine load
  hits both alike; one-sided Mann-Whitney U test plus the p50 and p95 ratios (a significant
  slowdown fails only when one of the ratios exceeds its limit).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmstack._verbs import Overrides, open_registry, read_settings
from llmstack.errors import ConfigError, LLMStackError
from llmstack.validate._config import ValidateConfig
from llmstack.validate._loading import ComparedModel, ModelSpec, load_side
from llmstack.validate._report import CheckResult, ValidationReport
from llmstack.validate._stats import distribution_shift, ks_test, latency_test, perplexity_bootstrap

if TYPE_CHECKING:
    from llmstack.registry import Registry

#: Probe prompts used when none are given: code and prose in the style of the built-in corpus.
DEFAULT_PROBES: tuple[str, ...] = (
    "Return the number of",
    "def __init__(self, ",
    "Module os.path\n\nCommon operations on",
    "Raise ValueError if the",
    "This module provides",
    "import sys\nimport os\n\ndef main():\n    ",
    "The default value is",
    "If the file does not exist,",
    "class Queue:\n    \"\"\"",
    "Return True if the string",
    "Convert a string to",
    "for line in open(path):\n    ",
    "The function returns a list of",
    "See the documentation for",
    "Parse the arguments and",
    "Create a new socket using the given",
    "Return a copy of the",
    "An exception is raised when",
    "Question: What does `json.dumps` do?\nAnswer:",
    "with open(filename, 'rb') as f:\n    data = ",
    "Return the absolute path of",
    "This function is deprecated; use",
    "Iterate over the items of",
    "Set the current time to",
)
DEFAULT_EVAL_DOCUMENTS = 100  # built-in documents packed for held-out data when nothing says otherwise
# Packed eval splits of recent calls, keyed on (data config, tokenizer fingerprint): a gate run in a
# loop (benchmarks, quickstart) tokenizes its held-out corpus once.
_EVAL_CACHE: dict[tuple[str, str], tuple[Any, str]] = {}


class IncomparableModelsError(LLMStackError, ValueError):
    """The two models cannot be compared (different tokenizers, vocabularies or model families)."""


def validate(config: ValidateConfig | Mapping[str, Any] | str | Path | None = None, *,
             candidate: ModelSpec | None = None, baseline: ModelSpec | None = None,
             registry: Registry | str | None = None, overrides: Overrides = (), probes: list[str] | str | None = None,
             eval_data: Any = None, store: bool = True, progress: bool | None = None,
             **settings: Any) -> ValidationReport:
    """Compare the model ``candidate`` with ``baseline`` on the same probes and held-out data.

    Args:
        config: the gate's thresholds: a :class:`ValidateConfig`, a mapping of its fields, or a YAML file path
            (None: defaults). A mapping or file may also hold ``candidate`` and ``baseline``.
        candidate: the model: a registry ref (``name@vN``, alias, name), a local directory, an
            ``llmstack.models.Artifact`` or ``(model, tokenizer)``. Everything but a pair loads through
            ``llmstack.models.load_artifact``: adapters (LoRA, DoRA, BitFit, QLoRA) on the base they were
            trained on (QLoRA's NF4 base), quantized versions rebuilt by ``llmstack.quantize``.
        baseline: same forms; usually the current holder of ``name@production``.
        registry: where refs resolve and the report is stored: a Registry or URL (None: the default registry).
        overrides: ``key.path=value`` strings (or a mapping of key paths to values) applied on top of ``config``;
            ``candidate=...`` and ``baseline=...`` are accepted here too (the CLI's form).
        probes: prompts for the distribution check and generations (None: :data:`DEFAULT_PROBES`),
            or a path / source string read with ``llmstack.data.load_corpus``.
        eval_data: held-out data: None (the eval split of the data config in the candidate's or
            baseline's manifest, else the built-in corpus), a corpus source string, a
            ``DataConfig``/dict, a list of texts, or a ``LongTensor [blocks, tokens]``.
        store: attach the report to the candidate (``annotations['validation']`` and the key
            ``Registry.promote`` looks for) when both sides are registry versions.
        progress: show a progress bar (None: when attached to a terminal).
        **settings: threshold keys as values, applied last, e.g. ``max_mean_kl=0.1``.

    Returns:
        A :class:`ValidationReport`; ``report.passed`` is the gate's verdict and ``report.ref`` the candidate's
        :class:`~llmstack.registry.ArtifactRef` (None for a model that is not a registry version).

    Raises:
        IncomparableModelsError: different tokenizers, vocabularies or model families.
        ConfigError: bad thresholds, an empty probe set, or no candidate/baseline.
        ArtifactNotFoundError / ModelLoadError: a side cannot be found or loaded.

    Example:
        >>> import llmstack
        >>> report = llmstack.validate(candidate="tiny-lm-int8@v1", baseline="tiny-lm@production")  # doctest: +SKIP
        >>> print(report.to_text())  # doctest: +SKIP
        >>> llmstack.Registry().promote(report.ref)  # doctest: +SKIP
    """
    import torch
    from tqdm.auto import tqdm

    cfg, given = read_settings("validate", ValidateConfig, config, overrides, settings,
                               inputs={"candidate": candidate, "baseline": baseline})
    candidate, baseline = given["candidate"], given["baseline"]
    missing = [side for side in ("candidate", "baseline") if given[side] is None]
    if missing:
        raise ConfigError(f"{' and '.join(missing)}: not given; validate() compares a candidate with a baseline "
                          "(validate(candidate=..., baseline=...), `llmstack validate MODEL baseline=REF`)")
    if isinstance(registry, str):
        registry = open_registry(registry)
    probe_texts = _probe_texts(probes)
    started = time.perf_counter()
    steps = ["load", "probes", "held-out", "generations", "latency"]
    with tqdm(total=len(steps), desc="validate", unit="step",
              disable=(None if progress is None else not progress)) as bar:
        cand = load_side(candidate, registry=registry, role="candidate")
        base = load_side(baseline, registry=registry, role="baseline")
        _check_comparable(cand, base)
        bar.update(1)
        tokenizer = base.tokenizer
        # Keep each probe's last tokens, leaving room for the generated ones within the context.
        keep = max(1, min(_context(cand.model), _context(base.model))
                   - max(cfg.generation_tokens, cfg.latency_new_tokens))
        probe_ids = [ids[-keep:] for ids in (_encode(tokenizer, text) for text in probe_texts) if ids.numel() > 0]
        if not probe_ids:
            raise ConfigError("probes: every probe prompt tokenizes to nothing; pass non-empty prompts")
        with torch.inference_mode():
            base_probe = _probe_logits(base.model, probe_ids)
            cand_probe = _probe_logits(cand.model, probe_ids)
            bar.update(1)
            blocks, data_info = _eval_blocks(eval_data, tokenizer, cand, base, cfg)
            base_nll, base_tok, base_eval_finite = _score_blocks(base.model, blocks)
            cand_nll, cand_tok, cand_eval_finite = _score_blocks(cand.model, blocks)
            bar.update(1)
            base_empty = _empty_fraction(base.model, tokenizer, probe_ids, cfg.generation_tokens)
            cand_empty = _empty_fraction(cand.model, tokenizer, probe_ids, cfg.generation_tokens)
            bar.update(1)
            base_lat, cand_lat = _latencies(base.model, cand.model, tokenizer, probe_ids, cfg)
            bar.update(1)

    checks = [
        _sanity_check(bool(torch.isfinite(cand_probe).all()) and cand_eval_finite,
                      bool(torch.isfinite(base_probe).all()) and base_eval_finite, cand_empty, base_empty, cfg),
        _distribution_check(base_probe, cand_probe, cfg),
        _loglik_check(base_tok, cand_tok, cfg),
        _perplexity_check(base_nll, cand_nll, cfg),
        _latency_check(base_lat, cand_lat, cfg),
    ]
    report = ValidationReport(
        candidate=cand.label, baseline=base.label, checks=checks,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        config=_config_dict(cfg),
        info={"probes": len(probe_ids), "probe_positions": int(base_probe.shape[0]),
              "eval_blocks": int(blocks.shape[0]), "eval_block_tokens": int(blocks.shape[1]),
              **data_info, "seconds": round(time.perf_counter() - started, 2)})
    if store and cand.ref is not None and base.ref is not None:
        _store(report, cand, base, registry)
    return report


# --------------------------------------------------------------------------- inputs


def _probe_texts(probes: list[str] | str | tuple[str, ...] | None) -> list[str]:
    if probes is None:
        return list(DEFAULT_PROBES)
    if isinstance(probes, (str, Path)):
        from llmstack.data import load_corpus

        probes = load_corpus(str(probes)).documents
    texts = [p for p in probes if isinstance(p, str) and p.strip()]
    if not texts:
        raise ConfigError("probes: the probe set is empty; pass at least one non-empty prompt "
                          "(or None for the built-in probes)")
    return texts


def _encode(tokenizer: Any, text: str) -> Any:
    return tokenizer(text, return_tensors="pt")["input_ids"][0]  # [T]


def _check_comparable(cand: ComparedModel, base: ComparedModel) -> None:
    """Refuse comparisons whose numbers would mean nothing."""
    base_type = getattr(getattr(base.model, "config", None), "model_type", None)
    cand_type = getattr(getattr(cand.model, "config", None), "model_type", None)
    if base_type and cand_type and base_type != cand_type:
        raise IncomparableModelsError(
            f"{cand.label} ({cand_type}) and {base.label} ({base_type}) are different model families; "
            "validate compares versions of one model (fine-tuned, quantized, retrained)")
    if base.tokenizer is None or cand.tokenizer is None:
        raise IncomparableModelsError("both models need a tokenizer to be compared")
    base_vocab, cand_vocab = base.tokenizer.get_vocab(), cand.tokenizer.get_vocab()
    if base_vocab != cand_vocab:
        differing = len(set(base_vocab.items()) ^ set(cand_vocab.items()))
        raise IncomparableModelsError(
            f"{cand.label} and {base.label} use different tokenizers (vocabulary {len(cand_vocab)} vs "
            f"{len(base_vocab)} tokens, {differing} entries differ); their token distributions cannot be "
            "compared. Validate against a baseline trained with the same tokenizer")
    base_out = _output_size(base.model)
    cand_out = _output_size(cand.model)
    if base_out and cand_out and base_out != cand_out:
        raise IncomparableModelsError(f"{cand.label} predicts {cand_out} tokens but {base.label} predicts "
                                      f"{base_out}; the vocabularies differ")


def _output_size(model: Any) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "vocab_size", None)


def _eval_blocks(eval_data: Any, tokenizer: Any, cand: ComparedModel, base: ComparedModel,
                 cfg: ValidateConfig) -> tuple[Any, dict[str, Any]]:
    """Held-out token blocks ``[n, T]`` shared by both models, and a note on where they came from."""
    import torch

    context = min(_context(cand.model), _context(base.model))
    length = min(cfg.eval_block_size, context)
    if isinstance(eval_data, torch.Tensor):
        blocks, info = eval_data.long(), {"eval_data": "given tensor"}
    elif isinstance(eval_data, (list, tuple)):
        blocks, info = _pack_texts(list(eval_data), tokenizer, length), {"eval_data": f"{len(eval_data)} texts"}
    else:
        blocks, info = _packed_eval(eval_data, tokenizer, cand, base, length)
    if blocks.dim() != 2 or blocks.shape[0] < 2 or blocks.shape[1] < 2:
        raise ConfigError(f"eval_data: need at least 2 held-out blocks of >= 2 tokens, got shape "
                          f"{tuple(blocks.shape)}")
    return blocks[: cfg.max_eval_blocks, :context], info


def _context(model: Any) -> int:
    config = getattr(model, "config", None)
    return int(getattr(config, "max_position_embeddings", None) or 1024)


def _pack_texts(texts: list[str], tokenizer: Any, length: int) -> Any:
    import torch

    from llmstack.data.packing import encode_documents

    if tokenizer.eos_token_id is None:
        raise ConfigError("eval_data: the tokenizer has no eos token to join the texts with; give token blocks "
                          "(a LongTensor) or a data config instead")
    # Each text as the tokenizer encodes it (with its BOS where it adds one), as the model saw text in training.
    stream = [t for ids in encode_documents(texts, tokenizer) for t in ids]
    n = len(stream) // length
    return torch.tensor(stream[: n * length], dtype=torch.long).view(n, length)


def _packed_eval(eval_data: Any, tokenizer: Any, cand: ComparedModel, base: ComparedModel,
                 length: int) -> tuple[Any, dict[str, Any]]:
    """The eval split of a data config: the manifest's own (truly held out) or the built-in corpus."""
    from llmstack.config import DataConfig, load_config
    from llmstack.data import prepare_training_data

    builtin = {"source": "builtin:stdlib", "max_documents": DEFAULT_EVAL_DOCUMENTS, "block_size": length}
    attempts: list[tuple[dict[str, Any], str]] = []
    if eval_data is None:
        for side in (cand, base):
            data = side.manifest.config.get("data") if side.manifest else None
            if isinstance(data, dict) and "source" in data and (data.get("max_documents") or 10**9) <= 5000:
                fields = {k: v for k, v in data.items() if k in DataConfig.__dataclass_fields__ and k != "tokenizer"}
                attempts.append((fields, f"eval split of {side.label}'s training data ({fields['source']})"))
                break
        attempts.append((builtin, "builtin:stdlib eval split"))
    elif isinstance(eval_data, str):
        attempts.append(({"source": eval_data, "block_size": length}, f"eval split of {eval_data}"))
    else:
        attempts.append((eval_data, "eval split of the given data config"))
    from llmstack.config import to_dict
    from llmstack.data import tokenizer_fingerprint

    for i, (data_config, note) in enumerate(attempts):
        try:
            config = load_config(DataConfig, data_config)
            key = None
            if config.source.startswith("builtin:"):  # deterministic sources only: files may change
                try:
                    key = (json.dumps(to_dict(config), sort_keys=True, default=str), tokenizer_fingerprint(tokenizer))
                except LLMStackError:
                    key = None
            if key is not None and key in _EVAL_CACHE:
                blocks, fingerprint = _EVAL_CACHE[key]
            else:
                _, packed, _ = prepare_training_data(config, tokenizer=tokenizer, progress=False)
                blocks, fingerprint = packed.eval, packed.fingerprint
                if key is not None:
                    if len(_EVAL_CACHE) >= 4:
                        _EVAL_CACHE.pop(next(iter(_EVAL_CACHE)))
                    _EVAL_CACHE[key] = (blocks, fingerprint)
        except LLMStackError:
            if i + 1 < len(attempts):
                continue  # the training data is gone or unreadable here: fall back to the built-in corpus
            raise
        return blocks[:, :length], {"eval_data": note, "eval_fingerprint": fingerprint}
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- measurements


def _device(model: Any) -> Any:
    try:
        return next(model.parameters()).device
    except StopIteration:
        import torch

        return torch.device("cpu")


def _probe_logits(model: Any, probe_ids: list[Any]) -> Any:
    """Next-token logits at every position of every probe, concatenated: ``[positions, vocab]``."""
    import torch

    device = _device(model)
    rows = [model(input_ids=ids.unsqueeze(0).to(device)).logits[0].float().cpu() for ids in probe_ids]
    return torch.cat(rows, dim=0)


def _score_blocks(model: Any, blocks: Any, *, batch_size: int = 8) -> tuple[Any, Any, bool]:
    """Per-block mean NLL ``[n]``, per-token log-likelihoods ``[n * (T-1)]`` and whether logits were finite."""
    import torch

    device = _device(model)
    block_nll, token_ll, finite = [], [], True
    for start in range(0, blocks.shape[0], batch_size):
        batch = blocks[start:start + batch_size].to(device)  # [B, T]
        logits = model(input_ids=batch).logits.float()  # [B, T, V]
        finite = finite and bool(torch.isfinite(logits).all())
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1)  # predict token t+1 from prefix <= t
        ll = logprobs.gather(-1, batch[:, 1:].unsqueeze(-1)).squeeze(-1).cpu()  # [B, T-1]
        token_ll.append(ll.reshape(-1))
        block_nll.append(-ll.mean(dim=1))
    return torch.cat(block_nll).numpy(), torch.cat(token_ll).numpy(), finite


def _generate(model: Any, tokenizer: Any, ids: Any, new_tokens: int, *, exact: bool) -> Any:
    device = _device(model)
    inputs = ids.unsqueeze(0).to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kwargs: dict[str, Any] = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad,
                                  attention_mask=inputs.new_ones(inputs.shape))
    if exact:
        kwargs["min_new_tokens"] = new_tokens
    return model.generate(input_ids=inputs, **kwargs)[0, inputs.shape[1]:]


def _empty_fraction(model: Any, tokenizer: Any, probe_ids: list[Any], new_tokens: int) -> float:
    """Share of probes whose greedy continuation is empty or whitespace only."""
    empty = 0
    for ids in probe_ids:
        try:
            out = _generate(model, tokenizer, ids, new_tokens, exact=False)
        except RuntimeError:  # e.g. NaN probabilities: as good as no output
            empty += 1
            continue
        if not tokenizer.decode(out, skip_special_tokens=True).strip():
            empty += 1
    return empty / len(probe_ids)


def _latencies(base_model: Any, cand_model: Any, tokenizer: Any, probe_ids: list[Any],
               cfg: ValidateConfig) -> tuple[list[float], list[float]]:
    """Per-request seconds for both models, interleaved (AB BA ...) so load drifts hit both alike.

    Each sample is the median of ``latency_repeats`` back-to-back runs of one request, so a single
    descheduling on a busy machine does not pass for a slow model.
    """
    timings: dict[int, list[float]] = {0: [], 1: []}
    models = (base_model, cand_model)

    def timed(which: int, ids: Any) -> float:
        runs = []
        for _ in range(cfg.latency_repeats):
            begin = time.perf_counter()
            try:
                _generate(models[which], tokenizer, ids, cfg.latency_new_tokens, exact=True)
            except RuntimeError:
                pass  # a broken model still costs the time it took; sanity reports the breakage
            runs.append(time.perf_counter() - begin)
        return statistics.median(runs)

    for i in range(cfg.latency_warmup):
        for which in (0, 1):
            timed(which, probe_ids[i % len(probe_ids)])
    for i in range(cfg.latency_requests):
        ids = probe_ids[i % len(probe_ids)]
        for which in ((0, 1) if i % 2 == 0 else (1, 0)):
            timings[which].append(timed(which, ids))
    return timings[0], timings[1]


# --------------------------------------------------------------------------- checks


def _sanity_check(cand_finite: bool, base_finite: bool, cand_empty: float, base_empty: float,
                  cfg: ValidateConfig) -> CheckResult:
    allowed_empty = max(cfg.max_empty_fraction, base_empty)
    problems = []
    if not cand_finite:
        problems.append("candidate produces NaN/inf logits")
    if not base_finite:
        problems.append("baseline produces NaN/inf logits (the comparison is meaningless)")
    if cand_empty > allowed_empty:
        problems.append(f"{cand_empty:.0%} of candidate generations are empty")
    detail = "; ".join(problems) or "finite logits, generations not empty, same tokenizer"
    return CheckResult("sanity", not problems,
                       {"candidate_finite": cand_finite, "baseline_finite": base_finite,
                        "candidate_empty_fraction": cand_empty, "baseline_empty_fraction": base_empty},
                       {"max_empty_fraction": allowed_empty}, detail)


def _distribution_check(base_logits: Any, cand_logits: Any, cfg: ValidateConfig) -> CheckResult:
    m = distribution_shift(base_logits, cand_logits)
    ok = (m["mean_kl"] <= cfg.max_mean_kl and m["mean_js"] <= cfg.max_mean_js
          and m["top1_agreement"] >= cfg.min_top1_agreement)
    detail = (f"mean KL {m['mean_kl']:.4g} nats, JS {m['mean_js']:.4g}, top-1 agreement "
              f"{m['top1_agreement']:.1%} over {m['positions']} probe positions")
    return CheckResult("distribution", ok, m, {"max_mean_kl": cfg.max_mean_kl, "max_mean_js": cfg.max_mean_js,
                                               "min_top1_agreement": cfg.min_top1_agreement}, detail)


def _loglik_check(base_ll: Any, cand_ll: Any, cfg: ValidateConfig) -> CheckResult:
    m = ks_test(base_ll, cand_ll)
    shifted = not (m["p_value"] >= cfg.loglik_alpha or m["statistic"] <= cfg.max_ks_statistic)
    ok = not shifted and m["p_value"] == m["p_value"]  # NaN (non-finite log-likelihoods) fails
    detail = (f"KS distance {m['statistic']:.4g}, p={m['p_value']:.3g} over {m['n']} held-out tokens"
              + ("" if ok else " (shifted)"))
    return CheckResult("loglik_shift", ok, m, {"alpha": cfg.loglik_alpha,
                                               "max_ks_statistic": cfg.max_ks_statistic}, detail)


def _perplexity_check(base_nll: Any, cand_nll: Any, cfg: ValidateConfig) -> CheckResult:
    m = perplexity_bootstrap(base_nll, cand_nll, samples=cfg.bootstrap_samples, confidence=cfg.confidence,
                             seed=cfg.seed)
    ok = m["ci_high"] <= cfg.max_perplexity_increase  # NaN fails
    detail = (f"perplexity {m['candidate_perplexity']:.4g} vs {m['baseline_perplexity']:.4g} "
              f"({m['relative_change']:+.2%}, {cfg.confidence:.0%} CI {m['ci_low']:+.2%} .. {m['ci_high']:+.2%})")
    return CheckResult("perplexity", ok, m, {"max_perplexity_increase": cfg.max_perplexity_increase,
                                             "confidence": cfg.confidence}, detail)


def _latency_check(base_s: list[float], cand_s: list[float], cfg: ValidateConfig) -> CheckResult:
    m = latency_test(base_s, cand_s)
    # Slower means: the rank test says so AND the slowdown is large, at the median or the tail.
    slower = m["p_value"] < cfg.latency_alpha and (m["p50_ratio"] > cfg.max_latency_p50_ratio
                                                   or m["p95_ratio"] > cfg.max_latency_p95_ratio)
    detail = (f"p50 {m['candidate_p50_ms']:.1f} vs {m['baseline_p50_ms']:.1f} ms (x{m['p50_ratio']:.2f}), "
              f"p95 {m['candidate_p95_ms']:.1f} vs {m['baseline_p95_ms']:.1f} ms (x{m['p95_ratio']:.2f}), "
              f"Mann-Whitney p={m['p_value']:.3g} over {m['requests']} requests each")
    return CheckResult("latency", not slower, m, {"alpha": cfg.latency_alpha,
                                                  "max_p50_ratio": cfg.max_latency_p50_ratio,
                                                  "max_p95_ratio": cfg.max_latency_p95_ratio}, detail)


# --------------------------------------------------------------------------- storing


def _config_dict(cfg: ValidateConfig) -> dict[str, Any]:
    from llmstack.config import to_dict

    return to_dict(cfg)


def _store(report: ValidationReport, cand: ComparedModel, base: ComparedModel, registry: Registry | None) -> None:
    """Attach the report to the candidate: as the latest validation and keyed by baseline for promote()."""
    from llmstack.registry import Registry, validation_key

    registry = registry or Registry()
    data = report.to_dict()
    registry.annotate(cand.ref, "validation", data)
    registry.annotate(cand.ref, validation_key(base.ref), data)
