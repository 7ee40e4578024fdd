"""quantize() round trips: quantize, register, load back, generate — for every method."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from llmstack.config import QUANTIZE_METHODS, merge_sections
from llmstack.models import load_artifact
from llmstack.quantize import known_methods, quantize
from llmstack.quantize._evaluate import perplexity

from .conftest import FAST, NO_EVALUATION

# method -> extra config, and the bound on quantized-layer bytes vs fp32 (int8 ~0.26, 4-bit ~0.14)
CASES = {
    "int8": ({"bitsandbytes": {"threshold": 6.0}}, 0.30),
    "nf4": ({"bitsandbytes": {"block_size": 128, "double_quant": True}}, 0.20),
    "fp4": ({"bitsandbytes": {"double_quant": False}}, 0.20),
    "smoothquant": ({"smoothquant": {"search_alpha": True, "alpha_grid": [0.4, 0.6]}}, 0.30),
    "w8a8": ({}, 0.30),
    "int8-weight-only": ({"torchao": {"float_edge_layers": 0}}, 0.30),  # every layer (edge layers: test_torchao)
    "int8-dynamic": ({"torchao": {"float_edge_layers": 0}}, 0.30),
    "int4-weight-only": ({"torchao": {"group_size": 32}}, 0.20),
}


def test_dispatcher_and_config_list_the_same_methods() -> None:
    # dynamic-int8 (the old torch.ao method) stays a known name: an alias of int8-dynamic
    assert set(known_methods()) == set(QUANTIZE_METHODS) == set(CASES) | {"dynamic-int8"}


@pytest.mark.parametrize("method", list(CASES))
def test_round_trip(method: str, quant_registry: Any, held_out: Any) -> None:
    extra, bytes_bound = CASES[method]
    result = quantize(merge_sections(FAST, extra), source="tiny", method=method, registry=quant_registry)

    manifest = quant_registry.manifest(result.ref)
    assert manifest.kind == "quantized"
    assert manifest.parents == ["tiny@v1"]
    assert manifest.config["method"] == method
    assert manifest.extra["quantization"]["method"] == method
    assert any(name.endswith(".safetensors") for name in manifest.files)
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in manifest.files)
    m = manifest.metrics
    for key in ("perplexity", "model_bytes", "quantized_layer_bytes", "prefill_tokens_per_s", "decode_tokens_per_s"):
        assert m[f"{key}_ratio"] == pytest.approx(m[key] / m[f"source_{key}"])
    assert m["quantized_layer_bytes_ratio"] < bytes_bound
    assert m["model_bytes_ratio"] < 0.5
    assert m["perplexity_ratio"] < 1.15  # a trained model survives every method
    assert m["file_bytes"] < m["source_model_bytes"] * 0.5

    loaded = load_artifact(result.ref, registry=quant_registry)
    # the loaded weights are the evaluated ones: same held-out perplexity as recorded at quantize time
    model, tokenizer = loaded.model, loaded.tokenizer
    assert perplexity(model, held_out) == pytest.approx(m["perplexity"], rel=1e-3)
    ids = tokenizer("def open(path", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] == ids.shape[1] + 6

    table = result.table()
    assert method in table and "decode tokens/s" in table and "perplexity" in table


def test_recipe_details(quant_registry: Any) -> None:
    sq = quantize(merge_sections(FAST, {"smoothquant": {"search_alpha": True, "alpha_grid": [0.3, 0.7]},
                                        "evaluation": {"enabled": False}}),
                  source="tiny", method="smoothquant", registry=quant_registry, name="tiny-sq")
    details = sq.recipe["details"]
    assert details["alpha"] in (0.3, 0.7)
    assert set(details["alpha_search"]["calibration_loss"]) == {"0.3", "0.7"}
    assert details["matmul"] == "torch._int_mm"
    assert "perplexity" not in sq.metrics and "evaluation skipped" in sq.table()

    nf4 = quantize({"bitsandbytes": {"block_size": 128}, **NO_EVALUATION}, source="tiny", method="nf4", registry=quant_registry,
                   name="tiny-nf4-128")
    model = load_artifact(nf4.ref, registry=quant_registry).model
    assert model.model.layers[0].self_attn.q_proj.weight.quant_state.blocksize == 128


def test_bf16_compute(quant_registry: Any) -> None:
    result = quantize({**FAST, "dtype": "bfloat16"}, source="tiny", method="w8a8", registry=quant_registry,
                      name="tiny-w8a8-bf16")
    model = load_artifact(result.ref, registry=quant_registry).model
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.model.layers[0].mlp.up_proj.weight_scale.dtype == torch.float32  # scales stay fp32
    assert result.metrics["perplexity_ratio"] < 1.1


def test_load_artifact_handles_plain_and_quantized(quant_registry: Any) -> None:
    plain = load_artifact("tiny@v1", registry=quant_registry, dtype="float32").model
    assert isinstance(plain.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    result = quantize(NO_EVALUATION, source="tiny", method="int8-dynamic", registry=quant_registry,
                      name="tiny-dyn")
    quantized = load_artifact(str(result.ref), registry=quant_registry, dtype="float32").model
    assert type(quantized.model.layers[1].self_attn.q_proj.weight).__name__ == "Int8Tensor"  # 0: a float edge layer
    config = json.loads((quant_registry.fetch(result.ref) / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "llmstack-torchao"
    # a plain directory of the same files routes through its recipe too
    via_directory = load_artifact(str(quant_registry.fetch(result.ref))).model
    assert type(via_directory.model.layers[2].mlp.down_proj.weight).__name__ == "Int8Tensor"


def test_w8a8_rows_do_not_depend_on_the_batch(quant_registry: Any) -> None:
    """Per-token activation scales: a served sequence decodes the same alone or next to a padded neighbour."""
    result = quantize(NO_EVALUATION, source="tiny", method="w8a8", registry=quant_registry,
                      name="tiny-w8a8-batch")
    loaded = load_artifact(result.ref, registry=quant_registry)
    model, tokenizer = loaded.model, loaded.tokenizer
    tokenizer.padding_side = "left"
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    batch = model.generate(**tokenizer(["def open(path, mode", "x"], return_tensors="pt", padding=True), **kwargs)
    alone = model.generate(**tokenizer(["x"], return_tensors="pt"), **kwargs)
    assert batch[1, -5:].tolist() == alone[0, -5:].tolist()
