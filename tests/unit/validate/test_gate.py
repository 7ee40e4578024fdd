"""The release gate on real tiny models: what must pass, what must fail, and bad input."""

from __future__ import annotations

import json
import types
from typing import Any

import pytest

from llmstack.config import load_config
from llmstack.errors import ConfigError
from llmstack.validate import (DEFAULT_PROBES, IncomparableModelsError, ValidateConfig, ValidationReport,
                               validate)

PROBES = list(DEFAULT_PROBES[:8])


def _run(candidate: Any, baseline: Any, tokenizer: Any, held_out: Any, **kw: Any) -> ValidationReport:
    thresholds = {"latency_requests": 8, "latency_repeats": 1, "generation_tokens": 6, "bootstrap_samples": 300,
                  "max_eval_blocks": 16}
    return validate(thresholds, candidate=(candidate, tokenizer), baseline=(baseline, tokenizer), probes=PROBES,
                    eval_data=held_out, progress=False, **kw)


def test_identical_copy_passes(model_a: Any, tokenizer: Any, held_out: Any, helpers: types.ModuleType) -> None:
    import copy

    report = _run(copy.deepcopy(model_a), model_a, tokenizer, held_out)
    assert report.passed, report.to_text()
    assert report.ref is None  # an in-memory candidate is no registry version
    dist = report.check("distribution").metrics
    assert dist["mean_kl"] == 0 and dist["top1_agreement"] == 1.0
    assert report.check("perplexity").metrics["relative_change"] == 0
    assert report.check("loglik_shift").metrics["p_value"] == 1.0


def test_faithful_int8_passes(model_a: Any, tokenizer: Any, held_out: Any, helpers: types.ModuleType) -> None:
    report = _run(helpers.fake_int8(model_a), model_a, tokenizer, held_out)
    assert report.passed, report.to_text()
    dist = report.check("distribution").metrics
    assert 0 < dist["mean_kl"] < 1e-3  # changed, but faithfully
    assert abs(report.check("perplexity").metrics["relative_change"]) < 0.01


def test_nan_weights_fail(model_a: Any, tokenizer: Any, held_out: Any, helpers: types.ModuleType) -> None:
    report = _run(helpers.with_nan(model_a), model_a, tokenizer, held_out)
    assert not report.passed
    assert {"sanity", "distribution", "perplexity"} <= set(report.failed_checks)
    assert "NaN/inf" in report.check("sanity").detail
    # The report reads as text and as strict JSON (NaNs become strings) and round-trips.
    text = report.to_text()
    assert "[FAIL] sanity" in text and "[PASS] latency" in text and report.summary in text
    data = json.loads(report.to_json())
    assert data["passed"] is False and data["failed_checks"] == report.failed_checks
    assert ValidationReport.from_dict(data).failed_checks == report.failed_checks
    assert data["config"]["max_mean_kl"] == ValidateConfig().max_mean_kl


def test_noised_weights_fail(model_a: Any, tokenizer: Any, held_out: Any, helpers: types.ModuleType) -> None:
    report = _run(helpers.noised(model_a, scale=1.0), model_a, tokenizer, held_out)
    assert not report.passed
    assert "distribution" in report.failed_checks and "perplexity" in report.failed_checks
    assert report.check("distribution").metrics["top1_agreement"] < 0.5


def test_model_trained_on_other_data_fails(model_a: Any, model_b: Any, tokenizer: Any,
                                           held_out_texts: list[str]) -> None:
    report = _run(model_b, model_a, tokenizer, held_out_texts)  # raw texts, packed by validate
    assert not report.passed
    assert {"distribution", "loglik_shift", "perplexity"} <= set(report.failed_checks)
    assert report.check("loglik_shift").metrics["p_value"] < 1e-6
    assert report.check("perplexity").metrics["ci_low"] > 0.2  # confidently worse, not just noisier


def test_slowed_model_fails_latency_only(model_a: Any, tokenizer: Any, held_out: Any,
                                         helpers: types.ModuleType) -> None:
    report = _run(helpers.slowed(model_a, factor=2.0), model_a, tokenizer, held_out)  # 3x slower
    assert report.failed_checks == ["latency"], report.to_text()
    latency = report.check("latency").metrics
    assert max(latency["p50_ratio"], latency["p95_ratio"]) > 1.5 and latency["p_value"] < 0.01


def test_different_tokenizer_is_a_clear_error(model_a: Any, tokenizer: Any, held_out: Any,
                                              held_out_texts: list[str]) -> None:
    from llmstack.data import train_tokenizer
    from llmstack.models import build_model

    other_tok = train_tokenizer(["completely different words here"] * 50 + held_out_texts[:2], vocab_size=300)
    other = build_model("tiny", vocab_size=len(other_tok), tokenizer=other_tok)
    with pytest.raises(IncomparableModelsError, match="different tokenizers"):
        validate(candidate=(other, other_tok), baseline=(model_a, tokenizer), probes=PROBES, eval_data=held_out,
                 progress=False)


def test_different_family_is_a_clear_error(model_a: Any, tokenizer: Any, held_out: Any) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_layer=1, n_head=2, n_embd=32, n_positions=128))
    with pytest.raises(IncomparableModelsError, match="different model families"):
        validate(candidate=(gpt2, tokenizer), baseline=(model_a, tokenizer), probes=PROBES, eval_data=held_out,
                 progress=False)


@pytest.mark.parametrize("probes", [[], ["   ", ""]])
def test_empty_probe_set_rejected(model_a: Any, tokenizer: Any, probes: list[str]) -> None:
    with pytest.raises(ConfigError, match="probe set is empty"):
        validate(candidate=(model_a, tokenizer), baseline=(model_a, tokenizer), probes=probes, progress=False)


def test_thresholds_checked_all_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(ValidateConfig, {"max_mean_kl": -1, "latency_requests": 1, "confidence": 1.5})
    assert len(info.value.problems) == 3
    assert any(p.startswith("max_mean_kl") for p in info.value.problems)
