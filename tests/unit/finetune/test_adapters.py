"""Adapter artifacts: peft safetensors files, lineage, loading, merging (QLoRA too), base refusal."""

from __future__ import annotations

import shutil

import pytest
import torch

from llmstack.errors import ConfigError, ModelLoadError
from llmstack.finetune import merge_adapter
from llmstack.finetune.lora import ensure_base_ref, load_trainable
from llmstack.models import load_artifact


def _logits(model, base) -> torch.Tensor:
    ids = base["data"].eval["input_ids"][:2]
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=base["data"].eval["attention_mask"][:2]).logits


def _trained_model(run):
    model = run["factory"]()
    model.load_state_dict(load_trainable(run["checkpoint"]), strict=False)
    return model.eval()


def test_lora_adapter_is_peft_safetensors_with_lineage(base, adapters) -> None:
    ref = adapters("lora")
    manifest = base["registry"].manifest(ref)
    assert manifest.kind == "adapter"
    assert manifest.parents == [str(base["ref"])]
    assert set(manifest.files) == {"adapter_config.json", "adapter_model.safetensors", "llmstack_adapter.json"}
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in manifest.files)
    from safetensors.torch import load_file

    tensors = load_file(str(base["registry"].fetch(ref) / "adapter_model.safetensors"))
    assert len(tensors) == 2 * 7 * 4  # A and B for 7 linears in each of 4 layers
    assert all("lora_A" in k or "lora_B" in k for k in tensors)


@pytest.mark.parametrize("method", ["lora", "dora", "bitfit"])
def test_loaded_adapter_reproduces_the_trained_model(base, trained, adapters, method: str) -> None:
    loaded = load_artifact(adapters(method), registry=base["registry"])
    model, tokenizer = loaded.model, loaded.tokenizer
    assert tokenizer is not None
    expected = _logits(_trained_model(trained(method)), base)
    torch.testing.assert_close(_logits(model, base), expected, rtol=1e-5, atol=1e-5)
    plain = _logits(load_artifact(str(base["ref"]), registry=base["registry"]).model, base)
    assert (expected - plain).abs().max() > 1e-3  # the adapter really changes the model


@pytest.mark.parametrize("method", ["lora", "bitfit"])
def test_merge_registers_a_model_with_adapter_and_base_as_parents(base, adapters, method: str) -> None:
    adapter = adapters(method)
    merged = merge_adapter(base["registry"], adapter, name=f"merged-{method}")
    manifest = base["registry"].manifest(merged)
    assert manifest.kind == "model"
    assert manifest.parents == [str(adapter), str(base["ref"])]
    model = load_artifact(str(merged), registry=base["registry"]).model
    assert not any("lora" in name for name, _ in model.named_parameters())
    with_adapter = load_artifact(adapter, registry=base["registry"]).model
    torch.testing.assert_close(_logits(model, base), _logits(with_adapter, base), rtol=1e-4, atol=1e-4)


def test_qlora_adapter_merges_through_the_dequantized_nf4_base(base, trained, adapters) -> None:
    adapter = adapters("qlora")
    info = base["registry"].fetch(adapter) / "llmstack_adapter.json"
    assert '"quant_type": "nf4"' in info.read_text()
    qlora_model = load_artifact(adapter, registry=base["registry"]).model  # NF4 base + adapter, as trained
    assert any(type(m).__name__ == "Linear4bit" for m in qlora_model.modules())
    reference = _logits(qlora_model, base)
    torch.testing.assert_close(reference, _logits(_trained_model(trained("qlora")), base), rtol=1e-5, atol=1e-5)

    merged = merge_adapter(base["registry"], adapter, name="merged-qlora")
    model = load_artifact(str(merged), registry=base["registry"]).model  # a plain fp32 model
    assert not any(type(m).__name__ == "Linear4bit" for m in model.modules())
    assert next(model.parameters()).dtype == torch.float32
    # The merged model computes what QLoRA trained with: dequantized NF4 weights, fp32 matmuls.
    torch.testing.assert_close(_logits(model, base), reference, rtol=1e-4, atol=1e-4)
    # Folding into the original fp32 weights instead would not reproduce the QLoRA model.
    original = load_artifact(str(base["ref"]), registry=base["registry"]).model.model.layers[0].self_attn.k_proj.weight
    assert (model.model.layers[0].self_attn.k_proj.weight - original).abs().max() > 1e-4


def test_adapter_on_a_different_registry_base_is_refused(base, adapters, make_base) -> None:
    other, _ = make_base(base["registry"], "other-base", seed=1)
    adapter = adapters("lora")
    with pytest.raises(ModelLoadError, match=rf"trained on {base['ref']} \(its lineage\), not {other}"):
        load_artifact(adapter, registry=base["registry"], base=str(other))
    with pytest.raises(ModelLoadError, match="refusing"):
        merge_adapter(base["registry"], adapter, base=str(other))


def test_adapter_on_a_local_directory_is_checked_by_weight_hash(base, adapters, make_base, tmp_path) -> None:
    registry, adapter = base["registry"], adapters("bitfit")
    same = shutil.copytree(registry.fetch(base["ref"]), tmp_path / "same")
    model = load_artifact(adapter, registry=registry, base=str(same)).model  # the very weights it was trained on
    assert model is not None
    other_ref, _ = make_base(registry, "third-base", seed=2)
    other = shutil.copytree(registry.fetch(other_ref), tmp_path / "other")
    with pytest.raises(ModelLoadError, match="not that model's"):
        load_artifact(adapter, registry=registry, base=str(other))


def test_only_adapters_load_as_adapters_and_never_as_bases(base, adapters) -> None:
    with pytest.raises(ModelLoadError, match="is a model, not an adapter"):
        load_artifact(str(base["ref"]), registry=base["registry"], base=str(base["ref"]))
    with pytest.raises(ConfigError, match="is an? adapter, expected a model"):
        ensure_base_ref(str(adapters("lora")), base["registry"], name="x")


def test_outside_base_directory_is_registered_once(base, tmp_path) -> None:
    registry = base["registry"]
    copy = shutil.copytree(registry.fetch(base["ref"]), tmp_path / "outside")
    first = ensure_base_ref(str(copy), registry, name="outside-base")
    again = ensure_base_ref(str(copy), registry, name="outside-base")
    assert first == again and registry.manifest(first).kind == "model"


def test_outside_base_is_named_after_the_model_not_the_config(base, tmp_path) -> None:
    registry = base["registry"]
    copy = shutil.copytree(registry.fetch(base["ref"]), tmp_path / "Some Model-1.5B")
    ref = ensure_base_ref(str(copy), registry)
    assert str(ref) == "Some-Model-1.5B@v1" and ensure_base_ref(str(copy) + "/", registry) == ref
    assert registry.manifest(ref).extra["registered_by"] == "finetune (outside base)"
