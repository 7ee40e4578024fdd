"""Serving the adapters fine-tuning produces beyond LoRA: BitFit and QLoRA, each on the base it was trained on.

Issue #11/#12: the engine refused BitFit ("not a peft adapter", a 500 per request) and applied QLoRA to the
fp32 base; an adapter beside a base it was not trained on was applied silently.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from llmstack.errors import ModelLoadError
from llmstack.serve.engine import TransformersEngine
from llmstack.serve.protocol import GenerationRequest, SamplingParams

PROMPT = "def add(a, b):"


@pytest.fixture
def tuned(tuned_adapters: dict[str, Any]) -> dict[str, Any]:
    return tuned_adapters  # tests/unit/conftest.py: a base, and a BitFit and a QLoRA adapter trained on it


def greedy(engine: TransformersEngine, model: str, tokens: int = 6) -> list[int]:
    request = GenerationRequest(model=model, prompt=PROMPT, sampling=SamplingParams(temperature=0, max_tokens=tokens))
    return asyncio.run(engine.generate(request)).choices[0].token_ids


def reference(model: Any, tokenizer: Any, tokens: int = 6) -> list[int]:
    """Greedy tokens of the trained model itself (no KV cache: a plain argmax loop)."""
    import torch

    ids = tokenizer(PROMPT, add_special_tokens=False, return_tensors="pt")["input_ids"]
    out: list[int] = []
    with torch.inference_mode():
        for _ in range(tokens):
            token = int(model(input_ids=ids).logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            out.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return out


@pytest.mark.parametrize("method", ["bitfit", "qlora"])
def test_adapter_served_as_the_model_answers_like_the_trained_model(tuned: dict[str, Any], method: str) -> None:
    engine = TransformersEngine.from_source(str(tuned[method]["ref"]), registry=tuned["registry"], cache_size=0)
    try:
        assert greedy(engine, f"ad-{method}") == reference(tuned[method]["model"], tuned["tokenizer"])
    finally:
        engine.shutdown()


def test_bitfit_beside_its_base_switches_per_request(tuned: dict[str, Any]) -> None:
    engine = TransformersEngine.from_source(str(tuned["ref"]), registry=tuned["registry"], cache_size=0,
                                            adapters=[str(tuned["bitfit"]["ref"])])
    try:
        base_tokens = greedy(engine, "base")
        assert greedy(engine, "ad-bitfit") == reference(tuned["bitfit"]["model"], tuned["tokenizer"])
        assert greedy(engine, "base") == base_tokens  # the base is untouched after the adapter ran
    finally:
        engine.shutdown()


def test_adapter_on_another_base_is_refused_naming_both(tuned: dict[str, Any], finetune_helpers: Any) -> None:
    other, _ = finetune_helpers.make_base(tuned["registry"], name="other-base", seed=7)
    with pytest.raises(ModelLoadError, match="base@v1") as err:
        TransformersEngine.from_source(str(other), registry=tuned["registry"],
                                       adapters=[str(tuned["bitfit"]["ref"])])
    assert str(other) in str(err.value)
    with pytest.raises(ModelLoadError, match="NF4|quantized|qlora"):  # QLoRA beside the fp32 base it is not
        TransformersEngine.from_source(str(tuned["ref"]), registry=tuned["registry"],
                                       adapters=[str(tuned["qlora"]["ref"])])
