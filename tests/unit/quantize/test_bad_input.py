"""Every bad input fails with a clear error before any model work or registry write."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from llmstack.errors import ConfigError, DataError, LLMStackError, ResourceError
from llmstack.quantize import quantize


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch, quant_registry: Any) -> Any:
    """Fails the test if quantize() loads the float weights or writes to the registry."""
    import llmstack.models.artifact as loading

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("quantize() started work before rejecting its input")

    monkeypatch.setattr(loading, "load_artifact", forbidden)
    monkeypatch.setattr(quant_registry, "register", forbidden)
    return quant_registry


def test_unknown_method_lists_known_ones(no_work: Any) -> None:
    with pytest.raises(ConfigError) as info:
        quantize(source="tiny", method="int3", registry=no_work)
    assert isinstance(info.value, ValueError)
    for known in ("int8-weight-only", "int8-dynamic", "int4-weight-only", "int8", "nf4", "fp4", "smoothquant", "w8a8"):
        assert known in str(info.value)
    with pytest.raises(ConfigError, match="known: int8"):
        quantize({"method": "gptq"}, source="tiny", registry=no_work)


def test_bad_config_values_are_reported_together(no_work: Any) -> None:
    with pytest.raises(ConfigError) as info:
        quantize({"bitsandbytes": {"block_size": 100}, "smoothquant": {"alpha": 2.0}}, source="tiny", method="nf4",
                 registry=no_work)
    assert "bitsandbytes.block_size" in str(info.value) and "smoothquant.alpha" in str(info.value)


def test_already_quantized_source(quant_registry: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    result = quantize({"evaluation": {"enabled": False}}, source="tiny", method="w8a8", registry=quant_registry,
                      name="tiny-q-src")
    import llmstack.models.artifact as loading

    monkeypatch.setattr(loading, "load_artifact", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(ConfigError, match="already quantized.*tiny@v1"):
        quantize(source=str(result.ref), method="int8", registry=quant_registry)
    # the same for a bare directory that holds a quantized model
    with pytest.raises(ConfigError, match="already quantized"):
        quantize(source=str(quant_registry.fetch(result.ref)), method="nf4", registry=quant_registry)


@pytest.mark.parametrize("calibration", [[], "", ["   ", ""], torch.zeros(0, 16, dtype=torch.long)],
                         ids=["empty-list", "empty-string", "blank-texts", "empty-tensor"])
def test_empty_calibration_set(no_work: Any, calibration: Any) -> None:
    with pytest.raises(DataError, match="empty calibration set"):
        quantize(source="tiny", method="smoothquant", calibration=calibration, registry=no_work)


def test_empty_calibration_file(no_work: Any, tmp_path: Path) -> None:
    empty = tmp_path / "calib.jsonl"
    empty.write_text("")
    with pytest.raises(DataError):
        quantize(source="tiny", method="smoothquant", calibration=str(empty), registry=no_work)


def _register_dir(registry: Any, name: str, model: Any, tokenizer: Any) -> str:
    from llmstack.models import register_model

    return str(register_model(registry, name, model, tokenizer, kind="model"))


def test_architecture_without_rmsnorm_before_projections(quant_registry: Any, trained_tiny: Any,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import OlmoConfig, OlmoForCausalLM

    tokenizer = trained_tiny[1]
    olmo = OlmoForCausalLM(OlmoConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, intermediate_size=64, eos_token_id=tokenizer.eos_token_id,
                                      pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id))
    ref = _register_dir(quant_registry, "olmo", olmo, tokenizer)
    import llmstack.models.artifact as loading

    monkeypatch.setattr(loading, "load_artifact", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(ConfigError, match="no RMSNorm input_layernorm"):
        quantize(source=ref, method="smoothquant", registry=quant_registry)


def test_architecture_without_decoder_linears(quant_registry: Any, trained_tiny: Any,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = trained_tiny[1]
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=64,
                                      eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id))
    ref = _register_dir(quant_registry, "gpt2ish", gpt2, tokenizer)
    import llmstack.models.artifact as loading

    monkeypatch.setattr(loading, "load_artifact", lambda *a, **k: pytest.fail("work started"))
    for method in ("w8a8", "smoothquant", "int8", "int8-dynamic"):
        with pytest.raises(ConfigError, match="model.layers"):
            quantize(source=ref, method=method, registry=quant_registry)


def test_int8_kernel_missing_on_this_hardware(no_work: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from llmstack.quantize import _int8 as int8

    monkeypatch.setattr(int8, "int_mm_problem", lambda device="cpu": "torch._int_mm is unavailable on cpu: no kernel")
    with pytest.raises(ResourceError, match="cannot run on this machine.*no kernel.*fake-quant"):
        quantize(source="tiny", method="w8a8", registry=no_work)


def test_llm_int8_needs_avx512(no_work: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    with pytest.raises(ResourceError, match="AVX-512.*this CPU: AVX2"):
        quantize(source="tiny", method="int8", registry=no_work)


def test_unknown_source(quant_registry: Any) -> None:
    with pytest.raises(LLMStackError):
        quantize(source="nosuchmodel@v3", method="int8", registry=quant_registry)
