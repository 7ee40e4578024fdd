"""The gate wired to the registry: stored reports, promotion, forced promotion, rollback, loaders."""

from __future__ import annotations

import copy
import types
from pathlib import Path
from typing import Any

import pytest

from llmstack.errors import ModelLoadError, ValidationFailedError
from llmstack.models import register_model
from llmstack.registry import Registry, validation_key
from llmstack.validate import DEFAULT_PROBES, validate

PROBES = list(DEFAULT_PROBES[:8])
FAST = {"latency_requests": 8, "latency_repeats": 1, "generation_tokens": 6, "bootstrap_samples": 300,
        "max_eval_blocks": 16}


@pytest.fixture
def reg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Registry:
    monkeypatch.setenv("LLMSTACK_CACHE", str(tmp_path / "cache"))
    return Registry(str(tmp_path / "registry"))


def test_validate_then_promote_force_and_rollback(reg: Registry, model_a: Any, model_b: Any, tokenizer: Any,
                                                  held_out: Any, helpers: types.ModuleType) -> None:
    v1 = register_model(reg, "tiny-lm", model_a, tokenizer, kind="model")
    reg.promote(v1, reason="first release")
    v2 = register_model(reg, "tiny-lm", helpers.fake_int8(model_a), tokenizer, kind="model", parents=[str(v1)])
    v3 = register_model(reg, "tiny-lm", model_b, tokenizer, kind="model")
    with pytest.raises(ValidationFailedError, match="no validation report"):
        reg.promote(v2)

    report = validate(FAST, candidate="tiny-lm@v2", baseline="tiny-lm@production", registry=reg, probes=PROBES,
                      eval_data=held_out, progress=False)
    assert report.passed, report.to_text()
    assert (report.candidate, report.baseline) == ("tiny-lm@v2", "tiny-lm@v1")  # the alias was resolved
    assert report.ref == v2  # the candidate as a registry version, what promote takes
    stored = reg.annotations(v2)
    assert stored["validation"]["passed"] is True and stored[validation_key(v1)]["baseline"] == "tiny-lm@v1"
    event = reg.promote(v2, reason="int8 is faithful")
    assert (event["action"], event["from"], event["to"], event["report"]["passed"]) == ("promote", 1, 2, True)

    bad = validate(FAST, candidate=v3, baseline="tiny-lm@production", registry=reg, probes=PROBES,
                   eval_data=held_out, progress=False)
    assert not bad.passed
    with pytest.raises(ValidationFailedError, match="failed: .*distribution"):
        reg.promote(v3)
    forced = reg.promote(v3, force=True, reason="incident override")
    assert forced["action"] == "force-promote" and forced["forced"] is True
    assert forced["report"]["passed"] is False and "distribution" in forced["report"]["failed_checks"]
    back = reg.rollback("tiny-lm", reason="force-promoted model misbehaves")
    assert (back["from"], back["to"]) == (3, 2) and reg.resolve("tiny-lm@production") == v2
    assert [(e["action"], e["from"], e["to"]) for e in reg.history("tiny-lm")] == [
        ("promote", None, 1), ("promote", 1, 2), ("force-promote", 2, 3), ("rollback", 3, 2)]


def test_adapter_loads_on_its_base(reg: Registry, model_a: Any, tokenizer: Any, held_out: Any,
                                   tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    base = register_model(reg, "tiny-lm", model_a, tokenizer, kind="model")
    lora = get_peft_model(copy.deepcopy(model_a), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    lora.save_pretrained(str(tmp_path / "adapter"))  # adapter_model.safetensors; B=0 so outputs are unchanged
    adapter = reg.register("tiny-lm-lora", tmp_path / "adapter", kind="adapter", parents=[str(base)])
    report = validate(FAST, candidate=adapter, baseline=base, registry=reg, probes=PROBES, eval_data=held_out,
                      progress=False)
    assert report.candidate == "tiny-lm-lora@v1"
    assert report.check("distribution").metrics["mean_kl"] < 1e-9
    assert report.check("perplexity").passed and report.check("sanity").passed
    assert "validation" in reg.annotations(adapter)


def test_quantized_versions_load_through_the_registered_loader(reg: Registry, model_a: Any, tokenizer: Any,
                                                               held_out: Any, helpers: types.ModuleType,
                                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from llmstack.models import artifact as artifact_module

    base = register_model(reg, "tiny-lm", model_a, tokenizer, kind="model")
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "quantization.json").write_text('{"method": "fake"}')
    tokenizer.save_pretrained(str(tmp_path / "q"))
    qref = reg.register("tiny-lm-int8", tmp_path / "q", kind="quantized", parents=[str(base)])
    calls = []

    def fake_loader(directory: Path, where: str) -> Any:
        calls.append((Path(directory), where))
        return helpers.fake_int8(model_a)

    monkeypatch.setattr(artifact_module, "QUANTIZED_LOADER_PACKAGES", ())  # only what this test registers
    monkeypatch.setattr(artifact_module, "_QUANTIZED_LOADERS", {"fake": fake_loader})
    report = validate(FAST, candidate=qref, baseline=base, registry=reg, probes=PROBES, eval_data=held_out,
                      progress=False)
    assert calls == [(reg.fetch(qref), "tiny-lm-int8@v1")]
    assert report.check("distribution").passed and report.check("perplexity").passed

    monkeypatch.setattr(artifact_module, "_QUANTIZED_LOADERS", {})  # no backend registered
    with pytest.raises(ModelLoadError, match=r"candidate: tiny-lm-int8@v1 is a quantized model \(fake\) that no "
                                             r"registered loader rebuilds"):
        validate(candidate=qref, baseline=base, registry=reg, probes=PROBES, eval_data=held_out, progress=False)


def test_non_model_artifacts_and_missing_versions(reg: Registry, tmp_path: Path, model_a: Any,
                                                  tokenizer: Any) -> None:
    from llmstack.errors import ArtifactNotFoundError

    base = register_model(reg, "tiny-lm", model_a, tokenizer, kind="model")
    (tmp_path / "tok").mkdir()
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    tok_ref = reg.register("tiny-tok", tmp_path / "tok", kind="tokenizer")
    with pytest.raises(ModelLoadError, match="is a tokenizer, not a model"):
        validate(candidate=tok_ref, baseline=base, registry=reg, progress=False)
    with pytest.raises(ArtifactNotFoundError):
        validate(candidate="tiny-lm@v9", baseline=base, registry=reg, progress=False)
    with pytest.raises(ArtifactNotFoundError):
        reg.promote("tiny-lm@v9")


def test_held_out_data_comes_from_the_training_config(reg: Registry, model_a: Any, tokenizer: Any,
                                                      held_out_texts: list[str], tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(held_out_texts))
    ref = register_model(reg, "tiny-lm", model_a, tokenizer, kind="model",
                         config={"data": {"source": str(corpus), "block_size": 32, "max_documents": 400,
                                          "eval_fraction": 0.2}})
    report = validate(FAST, candidate=ref, baseline=ref, registry=reg, probes=PROBES, progress=False)
    assert report.info["eval_data"].startswith("eval split of tiny-lm@v1's training data")
    assert report.info["eval_block_tokens"] == 32 and report.passed
    corpus.unlink()  # training data no longer reachable: fall back to the built-in corpus
    fallback = validate(FAST, candidate=ref, baseline=ref, registry=reg, probes=PROBES, progress=False, store=False)
    assert fallback.info["eval_data"] == "builtin:stdlib eval split"
