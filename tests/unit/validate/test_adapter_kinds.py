"""validate() of the adapters fine-tuning produces beyond LoRA: BitFit and QLoRA, each on the base it was trained on."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from llmstack.validate import DEFAULT_PROBES, validate

PROBES = list(DEFAULT_PROBES[:6])
FAST = {"latency_requests": 5, "latency_repeats": 1, "generation_tokens": 4, "bootstrap_samples": 200,
        "max_eval_blocks": 8}


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory, finetune_helpers: Any) -> Iterator[dict[str, Any]]:
    """A base, and a BitFit and a QLoRA adapter fine-tuned on it by the real loop (3 steps each)."""
    from llmstack.finetune.data import instruction_tensors
    from llmstack.finetune.lora import load_trainable
    from llmstack.registry import Registry

    ft = finetune_helpers
    root = tmp_path_factory.mktemp("validate-adapters")
    registry = Registry(str(root / "registry"))
    ref, tokenizer = ft.make_base(registry)
    world = {"registry": registry, "ref": ref, "tokenizer": tokenizer,
             "data": instruction_tensors(ft.QA, tokenizer, max_length=ft.BLOCK, max_rows=32)}
    for method in ("bitfit", "qlora"):
        run = ft.run_local(world, method, root / "runs", steps=3, lr=1e-2 if method == "bitfit" else 3e-3)
        trained = run["factory"]()
        trained.load_state_dict(load_trainable(run["checkpoint"]), strict=False)
        world[method] = {"ref": ft.register(world, run, f"ad-{method}"), "model": trained.eval()}
    yield world


@pytest.mark.parametrize("method", ["bitfit", "qlora"])
def test_adapter_validates_as_the_model_fine_tuning_trained(tuned: dict[str, Any], method: str) -> None:
    """Issue #12: validate refused BitFit ("not a peft adapter") and put QLoRA on the fp32 base."""
    registry, blocks = tuned["registry"], tuned["data"].eval["input_ids"][:8]
    adapter = tuned[method]["ref"]
    same = validate(str(adapter), (tuned[method]["model"], tuned["tokenizer"]), registry=registry, probes=PROBES,
                    eval_data=blocks, thresholds=FAST, progress=False)
    assert same.candidate == f"ad-{method}@v1"
    assert same.check("distribution").metrics["mean_kl"] < 1e-9  # exactly the trained model
    against_base = validate(adapter, tuned["ref"], registry=registry, probes=PROBES, eval_data=blocks,
                            thresholds=FAST, progress=False)
    assert (against_base.candidate, against_base.baseline) == (f"ad-{method}@v1", "base@v1")
    assert against_base.check("distribution").metrics["mean_kl"] > 1e-6  # the adapter is applied
    assert "validation" in registry.annotations(adapter)
