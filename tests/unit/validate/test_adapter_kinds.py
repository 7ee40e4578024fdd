"""validate() of the adapters fine-tuning produces beyond LoRA: BitFit and QLoRA, each on the base it was trained on."""

from __future__ import annotations

from typing import Any

import pytest

from llmstack.validate import DEFAULT_PROBES, validate

PROBES = list(DEFAULT_PROBES[:6])
FAST = {"latency_requests": 5, "latency_repeats": 1, "generation_tokens": 4, "bootstrap_samples": 200,
        "max_eval_blocks": 8}


@pytest.fixture
def tuned(tuned_adapters: dict[str, Any]) -> dict[str, Any]:
    return tuned_adapters  # tests/unit/conftest.py: a base, and a BitFit and a QLoRA adapter trained on it


@pytest.mark.parametrize("method", ["bitfit", "qlora"])
def test_adapter_validates_as_the_model_fine_tuning_trained(tuned: dict[str, Any], method: str) -> None:
    """Issue #12: validate refused BitFit ("not a peft adapter") and put QLoRA on the fp32 base."""
    registry, blocks = tuned["registry"], tuned["data"].eval["input_ids"][:8]
    adapter = tuned[method]["ref"]
    same = validate(FAST, candidate=str(adapter), baseline=(tuned[method]["model"], tuned["tokenizer"]),
                    registry=registry, probes=PROBES, eval_data=blocks, progress=False)
    assert same.candidate == f"ad-{method}@v1"
    assert same.check("distribution").metrics["mean_kl"] < 1e-9  # exactly the trained model
    against_base = validate(FAST, candidate=adapter, baseline=tuned["ref"], registry=registry, probes=PROBES,
                            eval_data=blocks, progress=False)
    assert (against_base.candidate, against_base.baseline) == (f"ad-{method}@v1", "base@v1")
    assert against_base.check("distribution").metrics["mean_kl"] > 1e-6  # the adapter is applied
    assert "validation" in registry.annotations(adapter)
