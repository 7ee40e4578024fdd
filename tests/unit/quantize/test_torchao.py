"""The torchao backend: round trips through models.load_artifact, old dynamic-int8 versions, dtypes, lineage."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from llmstack.config import QuantizeConfig, TorchaoConfig
from llmstack.quantize import quantize
from llmstack.quantize._base import Recipe, save_int8_model
from llmstack.quantize._evaluate import model_bytes
from llmstack.quantize.torchao_backend import BACKEND

from .conftest import FAST

METHODS = {  # method -> extra config, the quantized weight's torchao type
    "int8-weight-only": ({}, "Int8Tensor"),
    "int8-dynamic": ({}, "Int8Tensor"),
    "int4-weight-only": ({"group_size": 32}, "Int4OpaqueTensor"),
    "int4-weight-only (tinygemm)": ({"group_size": 64, "int4_algorithm": "tinygemm"}, "Int4OpaqueTensor"),
    "int8-weight-only (lm_head too)": ({"quantize_lm_head": True}, "Int8Tensor"),
    "int8-weight-only (bf16 compute)": ({"weight_only_compute": "bfloat16", "quantize_lm_head": True}, "Int8Tensor"),
}


def _quantize_and_save(model: Any, tokenizer: Any, method: str, extra: dict[str, Any], out: Path) -> Any:
    """The backend's quantize + save, and the recipe quantize() writes next to it."""
    config = QuantizeConfig(method=method, dtype=str(model.dtype).split(".")[-1], torchao=TorchaoConfig(**extra))
    quantized, details = BACKEND.quantize(model, method=method, source_dir=out, config=config, calibration=None,
                                          progress=lambda _m: None)
    BACKEND.save(quantized, out)
    tokenizer.save_pretrained(str(out))
    Recipe(method=method, format=BACKEND.format, source=None, dtype=config.dtype, details=details).write(out)
    return quantized


@pytest.mark.parametrize("label", list(METHODS))
def test_saved_version_gives_the_same_logits_through_load_artifact(label: str, trained_tiny: tuple[Any, Any],
                                                                   tmp_path: Path) -> None:
    from llmstack.models import load_artifact

    model, tokenizer = trained_tiny
    extra, weight_type = METHODS[label]
    method = label.split(" ")[0]
    ids = tokenizer(["def open(path, mode):", "import os"], return_tensors="pt", padding=True).input_ids
    with torch.inference_mode():
        float_logits = model(ids).logits
    quantized = _quantize_and_save(copy.deepcopy(model), tokenizer, method, extra, tmp_path)
    with torch.inference_mode():
        before = quantized(ids).logits

    loaded = load_artifact(str(tmp_path))
    assert loaded.artifact.kind == "quantized" and loaded.artifact.method == method
    layer = loaded.model.model.layers[1].mlp.down_proj
    assert type(layer.weight).__name__ == weight_type
    with torch.inference_mode():
        after = loaded.model(ids).logits
    assert torch.equal(before, after)  # the saved tensors are the quantized ones: nothing re-quantized at load
    assert not torch.equal(before, float_logits)  # and they are quantized
    rel = float((before - float_logits).norm() / float_logits.norm())
    assert rel < (0.15 if method.startswith("int4") else 0.05), rel
    assert after.dtype == torch.float32  # int4 computes in bf16 inside the layer; outputs in the model's dtype
    assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in tmp_path.iterdir())
    if extra.get("quantize_lm_head"):
        assert type(loaded.model.lm_head.weight).__name__ == "Int8Tensor"
        assert loaded.model.model.embed_tokens.weight.dtype == torch.float32  # the embedding stays float
    else:
        assert type(loaded.model.lm_head.weight) is torch.nn.Parameter


@pytest.mark.parametrize("lm_head", [False, True])
def test_tied_embeddings_are_stored_once_and_retied(lm_head: bool, trained_tiny: tuple[Any, Any],
                                                    tmp_path: Path) -> None:
    from safetensors import safe_open
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmstack.models import load_artifact

    tokenizer = trained_tiny[1]
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         tie_word_embeddings=True)).eval()
    ids = torch.tensor([[5, 9, 11, 3]])
    quantized = _quantize_and_save(model, tokenizer, "int8-weight-only", {"quantize_lm_head": lm_head}, tmp_path)
    with torch.inference_mode():
        before = quantized(ids).logits
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    assert ("lm_head.weight.qdata" in keys) == lm_head
    loaded = load_artifact(str(tmp_path)).model
    with torch.inference_mode():  # close, not equal: .to(bf16) also rounded the rotary buffers the reload keeps fp32
        after = loaded(ids).logits
    assert float((after.float() - before.float()).norm() / before.float().norm()) < 0.01
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == (not lm_head)


def test_bytes_count_the_int_data_not_the_nominal_float_shape(trained_tiny: tuple[Any, Any]) -> None:
    model = trained_tiny[0]
    source = model_bytes(model)
    int8, _ = BACKEND.quantize(copy.deepcopy(model), method="int8-weight-only", source_dir=Path("."),
                               config=QuantizeConfig(dtype="float32", torchao=TorchaoConfig(float_edge_layers=0)), calibration=None,
                               progress=lambda _m: None)
    int4, _ = BACKEND.quantize(copy.deepcopy(model), method="int4-weight-only", source_dir=Path("."),
                               config=QuantizeConfig(method="int4-weight-only", dtype="float32",
                                                     torchao=TorchaoConfig(group_size=32)),
                               calibration=None, progress=lambda _m: None)
    int8_share = model_bytes(int8)["quantized_layer_bytes"] / source["quantized_layer_bytes"]
    int4_share = model_bytes(int4)["quantized_layer_bytes"] / source["quantized_layer_bytes"]
    assert 0.25 < int8_share < 0.27  # 1 byte per weight + 4-byte scale (and int8 zero point) per row
    assert 0.12 < int4_share < 0.20  # half a byte per weight + bf16 scale and zero per 32 weights


def test_keep_float_and_edge_layers_stay_in_float(trained_tiny: tuple[Any, Any]) -> None:
    model = trained_tiny[0]  # 4 decoder layers
    config = QuantizeConfig(dtype="float32",
                            torchao=TorchaoConfig(keep_float=["*.mlp.gate_proj", "model.layers.1.self_attn.*"]))
    quantized, details = BACKEND.quantize(copy.deepcopy(model), method="int8-weight-only", source_dir=Path("."),
                                          config=config, calibration=None, progress=lambda _m: None)
    layers = quantized.model.layers
    assert type(layers[2].mlp.gate_proj.weight) is torch.nn.Parameter  # by pattern
    assert type(layers[1].self_attn.k_proj.weight) is torch.nn.Parameter
    assert type(layers[0].mlp.up_proj.weight) is torch.nn.Parameter  # first and last layer: float_edge_layers=1
    assert type(layers[3].self_attn.o_proj.weight) is torch.nn.Parameter
    assert type(layers[1].mlp.up_proj.weight).__name__ == "Int8Tensor"
    assert type(layers[2].self_attn.q_proj.weight).__name__ == "Int8Tensor"
    assert {"model.layers.2.mlp.gate_proj", "model.layers.0.mlp.up_proj"} <= set(details["keep_float"])
    assert not set(details["keep_float"]) & set(details["layers"])
    int4, _ = BACKEND.quantize(copy.deepcopy(model), method="int4-weight-only", source_dir=Path("."),
                               config=QuantizeConfig(method="int4-weight-only", dtype="float32",
                                                     torchao=TorchaoConfig(group_size=32)),
                               calibration=None, progress=lambda _m: None)
    assert type(int4.model.layers[0].mlp.up_proj.weight).__name__ == "Int4OpaqueTensor"  # int8 methods only


def test_old_dynamic_int8_versions_load_on_torchao(trained_tiny: tuple[Any, Any], tmp_path: Path) -> None:
    """A version saved by the removed torch.ao backend (int8 weight + per-row scale buffers) still loads."""
    from llmstack.models import load_artifact
    from llmstack.quantize._int8 import W8A8Linear, decoder_linear_names, replace_module

    model, tokenizer = trained_tiny
    old = copy.deepcopy(model)
    layers = decoder_linear_names(old)
    for name in layers:  # same tensors (weight int8, weight_scale fp32) the old DynamicInt8Linear stored
        replace_module(old, name, W8A8Linear.from_linear(old.get_submodule(name)))
    save_int8_model(old, tmp_path, method="dynamic-int8")
    tokenizer.save_pretrained(str(tmp_path))
    Recipe(method="dynamic-int8", format="llmstack-int8", source=None, dtype="float32",
           details={"layers": layers}).write(tmp_path)

    loaded = load_artifact(str(tmp_path))
    weight = loaded.model.model.layers[2].self_attn.o_proj.weight
    assert type(weight).__name__ == "Int8Tensor" and weight.act_quant_kwargs is not None
    assert torch.equal(weight.qdata, old.model.layers[2].self_attn.o_proj.weight)
    ids = tokenizer("def open(path", return_tensors="pt").input_ids
    with torch.inference_mode():
        # both run per-token dynamic int8 activations on the same int8 weights
        assert torch.allclose(loaded.model(ids).logits, old(ids).logits, rtol=0.05, atol=0.05)


def test_dynamic_int8_is_an_alias_of_int8_dynamic(quant_registry: Any) -> None:
    with pytest.warns(FutureWarning, match="int8-dynamic"):
        result = quantize({"evaluation": {"enabled": False}}, source="tiny", method="dynamic-int8", registry=quant_registry,
                          name="tiny-dyn-alias")
    assert result.recipe["details"]["method"] == "int8-dynamic"
    assert result.recipe["format"] == "torchao"


def test_default_method_and_dtype_follow_the_source(trained_tiny: tuple[Any, Any], tmp_path: Path) -> None:
    """A bf16-stored directory: quantized with the default method, non-quantized parts stay bf16, lineage recorded."""
    from llmstack.models import load_artifact, save_model
    from llmstack.registry import Registry

    model, tokenizer = trained_tiny
    source = tmp_path / "bf16-source"
    save_model(copy.deepcopy(model).to(torch.bfloat16), tokenizer, source)
    assert json.loads((source / "config.json").read_text())["dtype"] == "bfloat16"
    registry = Registry(str(tmp_path / "registry"))
    result = quantize(FAST, source=str(source), registry=registry)

    assert result.method == QuantizeConfig().method == "int8-weight-only"
    assert result.recipe["dtype"] == "bfloat16"
    manifest = registry.manifest(result.ref)
    assert manifest.parents == [str(source.resolve())]
    assert manifest.extra["source_identity"].startswith("dir:")
    loaded = load_artifact(str(result.ref), registry=registry)
    assert loaded.model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert loaded.model.model.norm.weight.dtype == torch.bfloat16
    assert loaded.model.model.layers[1].mlp.up_proj.weight.scale.dtype == torch.float32  # scales stay fp32
    assert result.metrics["perplexity_ratio"] < 1.05


def test_bf16_int8_weight_only_runs_the_fused_int8pack_kernel(trained_tiny: tuple[Any, Any], tmp_path: Path) -> None:
    """A bf16 model's int8-weight-only layers take aten's fused kernel (torchao's eager path would cast each whole
    int8 weight to bf16 at every call), also when loaded from a version whose recipe predates that default."""
    from llmstack.models import load_artifact
    from llmstack.quantize.torchao_backend import _int8pack_forward

    model, tokenizer = trained_tiny
    bf16_model = copy.deepcopy(model).to(torch.bfloat16)
    ids = tokenizer(["def open(path, mode):", "import os"], return_tensors="pt", padding=True).input_ids
    with torch.inference_mode():
        float_logits = bf16_model(ids).logits.float()
    quantized = _quantize_and_save(bf16_model, tokenizer, "int8-weight-only", {}, tmp_path)
    layer = quantized.model.layers[1].mlp.down_proj
    assert getattr(layer.forward, "__func__", None) is _int8pack_forward
    with torch.inference_mode():
        x = torch.randn(3, layer.in_features, dtype=torch.bfloat16)
        eager = torch.nn.functional.linear(x, layer.weight)  # torchao's per-call cast path, same int8 weights
        assert float((layer(x).float() - eager.float()).norm() / eager.float().norm()) < 0.01
        before = quantized(ids).logits
    assert before.dtype == torch.bfloat16
    assert float((before.float() - float_logits).norm() / float_logits.norm()) < 0.05

    recipe_path = tmp_path / "quantization.json"
    recipe = json.loads(recipe_path.read_text())
    assert recipe["details"]["int8pack"] is True
    recipe["details"]["int8pack"] = False  # as written before bf16 models took the kernel by default
    recipe_path.write_text(json.dumps(recipe))
    loaded = load_artifact(str(tmp_path)).model
    assert getattr(loaded.model.layers[1].mlp.down_proj.forward, "__func__", None) is _int8pack_forward
    with torch.inference_mode():  # close, not equal: .to(bf16) also rounded the rotary buffers the reload keeps fp32
        after = loaded(ids).logits
    assert float((after.float() - before.float()).norm() / before.float().norm()) < 0.01
