"""Serving the adapters fine-tuning produces beyond LoRA: BitFit and QLoRA, each on the base it was trained on.

Issue #11/#12: the engine refused BitFit ("not a peft adapter", a 500 per request) and applied QLoRA to the
fp32 base; an adapter beside a base it was not trained on was applied silently.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from llmstack.errors import ModelLoadError
from llmstack.serve.engine import TransformersEngine
from llmstack.serve.protocol import GenerationRequest, SamplingParams

PROMPT = "def add(a, b):"


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory, finetune_helpers: Any) -> Iterator[dict[str, Any]]:
    """A base, and a BitFit and a QLoRA adapter fine-tuned on it by the real loop (3 steps each)."""
    from llmstack.finetune.data import instruction_tensors
    from llmstack.finetune.lora import load_trainable
    from llmstack.registry import Registry

    ft = finetune_helpers
    root = tmp_path_factory.mktemp("serve-adapters")
    registry = Registry(str(root / "registry"))
    ref, tokenizer = ft.make_base(registry)
    world = {"registry": registry, "ref": ref, "tokenizer": tokenizer,
             "data": instruction_tensors(ft.QA, tokenizer, max_length=ft.BLOCK, max_rows=32)}
    for method in ("bitfit", "qlora"):
        run = ft.run_local(world, method, root / "runs", steps=3, lr=1e-2 if method == "bitfit" else 3e-3)
        trained = run["factory"]()
        trained.load_state_dict(load_trainable(run["checkpoint"]), strict=False)
        world[method] = {"ref": str(ft.register(world, run, f"ad-{method}")), "model": trained.eval()}
    yield world


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
    engine = TransformersEngine.from_source(tuned[method]["ref"], registry=tuned["registry"], cache_size=0)
    try:
        assert greedy(engine, f"ad-{method}") == reference(tuned[method]["model"], tuned["tokenizer"])
    finally:
        engine.shutdown()


def test_bitfit_beside_its_base_switches_per_request(tuned: dict[str, Any]) -> None:
    engine = TransformersEngine.from_source(str(tuned["ref"]), registry=tuned["registry"], cache_size=0,
                                            adapters=[tuned["bitfit"]["ref"]])
    try:
        base_tokens = greedy(engine, "base")
        assert greedy(engine, "ad-bitfit") == reference(tuned["bitfit"]["model"], tuned["tokenizer"])
        assert greedy(engine, "base") == base_tokens  # the base is untouched after the adapter ran
    finally:
        engine.shutdown()


def test_adapter_on_another_base_is_refused_naming_both(tuned: dict[str, Any], finetune_helpers: Any) -> None:
    other, _ = finetune_helpers.make_base(tuned["registry"], name="other-base", seed=7)
    with pytest.raises(ModelLoadError, match="base@v1") as err:
        TransformersEngine.from_source(str(other), registry=tuned["registry"], adapters=[tuned["bitfit"]["ref"]])
    assert str(other) in str(err.value)
    with pytest.raises(ModelLoadError, match="NF4|quantized|qlora"):  # QLoRA beside the fp32 base it is not
        TransformersEngine.from_source(str(tuned["ref"]), registry=tuned["registry"], adapters=[tuned["qlora"]["ref"]])
