"""Prepacked linear weights (serve/engine/kernels.py): same outputs as the plain layers, only plain layers packed."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from engine_helpers import greedy, served

from llmstack.serve.engine import AdapterSpec
from llmstack.serve.engine.kernels import PackedLinear, packing_supported, prepack_linears
from llmstack.serve.engine.loading import dir_identity

pytestmark = pytest.mark.skipif(packing_supported(torch.float32) is not None, reason="no oneDNN fp32 packing here")


def test_packed_layers_give_the_plain_layers_logits(tiny: tuple[Any, Any]) -> None:
    model = copy.deepcopy(tiny[0]).eval()
    plain_count = sum(type(m) is torch.nn.Linear for m in model.modules())
    ids = torch.randint(5, 200, (3, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
        assert prepack_linears(model) == plain_count > 0
        got = model(ids).logits
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    assert sum(isinstance(m, PackedLinear) for m in model.modules()) == plain_count
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_a_packed_engine_decodes_what_the_plain_one_does(tiny: tuple[Any, Any]) -> None:
    prompts = ["def add(a, b):", "import os", "class Config:", "x = [i for i in"]
    plain, packed = served(tiny), served(tiny, prepack_weights=True)
    try:
        assert "packed_linears" not in plain.stats and packed.stats["packed_linears"] > 0
        assert packed.replica_stats()["linear_modules"].get("PackedLinear") == packed.stats["packed_linears"]
        assert greedy(packed, prompts) == greedy(plain, prompts)  # batched: padding, masks and all
    finally:
        plain.shutdown()
        packed.shutdown()


def test_an_engine_that_serves_adapters_keeps_plain_layers(tiny: tuple[Any, Any], adapter_dirs: list[Any]) -> None:
    adapters = [AdapterSpec("lora-0", str(adapter_dirs[0]), dir_identity(adapter_dirs[0]))]
    engine = served(tiny, adapters=adapters, prepack_weights=True)
    try:
        assert "packed_linears" not in engine.stats
        assert not any(isinstance(m, PackedLinear) for m in engine.model.modules())
    finally:
        engine.shutdown()


def test_quantized_weights_and_other_dtypes_are_left_alone() -> None:
    class Marked(torch.Tensor):  # stands for a quantized weight tensor subclass (torchao's)
        pass

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    model[1].weight = torch.nn.Parameter(torch.randn(8, 8).as_subclass(Marked))
    assert prepack_linears(model) == 1  # the plain one only
    assert isinstance(model[0], PackedLinear) and type(model[1]) is torch.nn.Linear
    assert prepack_linears(torch.nn.Sequential(torch.nn.Linear(8, 8, dtype=torch.float16))) == 0
    assert "float16" in packing_supported(torch.float16)
