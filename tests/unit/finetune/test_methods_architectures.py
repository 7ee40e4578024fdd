"""QLoRA, DoRA, BitFit and full fine-tuning on every supported architecture, and their adapters loading back.

The models are tiny random-init ones built from each architecture's config class (see tests/unit/conftest.py).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from llmstack.config import FinetuneMethodConfig
from llmstack.errors import ConfigError, ResourceError
from llmstack.finetune.methods import apply_method, bitfit_plan, check_bitsandbytes, count_trainable
from llmstack.serve._testing import ARCHITECTURES

LAYERS = 2  # every tiny model has two decoder layers
# GPT-2's projections are transformers' Conv1D; named explicitly so this file does not depend on target discovery.
GPT2_TARGETS = ["c_attn", "c_fc", "c_proj"]

# What BitFit trains on each architecture: (bias vectors, norm parameters, norm classes).
BITFIT = {
    "llama": (0, 2 * LAYERS + 1, ["LlamaRMSNorm"]),
    "qwen2": (3 * LAYERS, 2 * LAYERS + 1, ["Qwen2RMSNorm"]),  # q/k/v projections carry biases
    "mistral": (0, 2 * LAYERS + 1, ["MistralRMSNorm"]),
    "gemma3": (0, 6 * LAYERS + 1, ["Gemma3RMSNorm"]),  # 4 layer norms + q_norm/k_norm per layer
    "phi3": (0, 2 * LAYERS + 1, ["Phi3RMSNorm"]),
    "gpt2": (4 * LAYERS, 2 * (2 * LAYERS + 1), ["LayerNorm"]),  # c_attn/c_proj/c_fc/c_proj biases; LN weight+bias
}


def _bnb_reason() -> str | None:
    try:
        check_bitsandbytes("cpu")
    except ResourceError as exc:
        return str(exc)
    return None


def _model(architecture: str, method: str, architecture_dir: Any, architecture_tokenizer: Any) -> Any:
    if method == "qlora":
        reason = _bnb_reason()
        if reason:
            pytest.skip(f"bitsandbytes cannot run NF4 on this CPU: {reason}")
        from llmstack.models.nf4 import load_nf4_model

        return load_nf4_model(architecture_dir(architecture))
    from llmstack.models import load_artifact

    return load_artifact(str(architecture_dir(architecture)), with_tokenizer=False).model


def _backward(model: Any, tokenizer: Any) -> torch.Tensor:
    ids = tokenizer(["def add(a, b):\n    return a + b", "import os\nprint(os.getcwd())"], return_tensors="pt",
                    padding=True)
    model.train()
    loss = model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"], labels=ids["input_ids"]).loss
    loss.backward()
    return loss


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("method", ["qlora", "dora", "bitfit", "full"])
def test_method_trains_exactly_its_parameters(architecture: str, method: str, architecture_dir: Any,
                                              architecture_tokenizer: Any) -> None:
    model = _model(architecture, method, architecture_dir, architecture_tokenizer)
    targets = GPT2_TARGETS if architecture == "gpt2" and method in ("qlora", "dora") else None
    tuned = apply_method(model, method, FinetuneMethodConfig(method=method, rank=4), target_modules=targets)
    loss = _backward(tuned, architecture_tokenizer)
    assert torch.isfinite(loss)
    trainable = {n: p for n, p in tuned.named_parameters() if p.requires_grad}
    frozen = {n: p for n, p in tuned.named_parameters() if not p.requires_grad}
    assert trainable
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable.values())
    assert any(p.grad.abs().sum() > 0 for p in trainable.values())
    assert all(p.grad is None for p in frozen.values())
    if method in ("qlora", "dora"):
        assert set(trainable) == {n for n in trainable if "lora_" in n}  # only adapter weights train
        if method == "dora":
            assert any("lora_magnitude_vector" in n for n in trainable)
        else:  # the frozen base's decoder projections are 4-bit
            kinds = {type(m).__name__ for m in tuned.modules()}
            assert "Linear4bit" in kinds
    elif method == "bitfit":
        plan = bitfit_plan(model)
        assert set(trainable) == set(plan.names)
    else:
        assert not frozen


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_bitfit_choice_per_architecture(architecture: str, architecture_dir: Any) -> None:
    from llmstack.models import load_artifact

    model = load_artifact(str(architecture_dir(architecture)), with_tokenizer=False).model
    plan = bitfit_plan(model)
    biases, norms, classes = BITFIT[architecture]
    assert (len(plan.bias_names), len(plan.norm_names), plan.norm_classes) == (biases, norms, classes)
    assert all(name.endswith(".bias") for name in plan.bias_names)
    assert type(model).__name__ in plan.describe()
    tuned = apply_method(model, "bitfit", FinetuneMethodConfig(method="bitfit"))
    expected = sum(p.numel() for n, p in tuned.named_parameters() if n in set(plan.names))
    assert count_trainable(tuned)[0] == expected


def test_bitfit_refuses_a_model_without_biases_or_norms_naming_its_classes() -> None:
    model = torch.nn.Sequential(torch.nn.Embedding(16, 8), torch.nn.Linear(8, 16, bias=False))
    with pytest.raises(ConfigError) as info:
        apply_method(model, "bitfit", FinetuneMethodConfig(method="bitfit"))
    message = str(info.value)
    assert "lora.method=bitfit" in message and "Sequential has no bias terms" in message
    assert "Embedding, Linear, Sequential" in message


# --------------------------------------------------------------------------- adapters load back (Qwen2)


@pytest.fixture(scope="module")
def qwen2_base(tmp_path_factory: pytest.TempPathFactory, architecture_dir: Any,
               architecture_tokenizer: Any) -> dict[str, Any]:
    from llmstack.finetune.data import instruction_tensors
    from llmstack.finetune.lora import ensure_base_ref
    from llmstack.registry import Registry

    root = tmp_path_factory.mktemp("qwen2-adapters")
    registry = Registry(str(root / "registry"))
    ref = ensure_base_ref(str(architecture_dir("qwen2")), registry, name="qwen2-base")
    data = instruction_tensors("builtin:stdlib-qa", architecture_tokenizer, max_length=64, max_rows=32)
    return {"registry": registry, "ref": ref, "data": data, "root": root}


@pytest.mark.parametrize("method", ["qlora", "dora", "bitfit"])
def test_adapter_of_each_method_loads_back_on_qwen2(method: str, qwen2_base: dict[str, Any],
                                                    finetune_helpers: Any) -> None:
    if method == "qlora" and _bnb_reason():
        pytest.skip(f"bitsandbytes cannot run NF4 on this CPU: {_bnb_reason()}")
    from llmstack.finetune.lora import load_trainable
    from llmstack.models import load_artifact

    run = finetune_helpers.run_local(qwen2_base, method, qwen2_base["root"], steps=2,
                                     lr=1e-2 if method == "bitfit" else 3e-3)
    ref = finetune_helpers.register(qwen2_base, run, f"qwen2-{method}")
    assert qwen2_base["registry"].manifest(ref).kind == "adapter"
    trained = run["factory"]()
    trained.load_state_dict(load_trainable(run["checkpoint"]), strict=False)
    loaded = load_artifact(str(ref), registry=qwen2_base["registry"])
    assert loaded.model.config.model_type == "qwen2"
    if method == "bitfit":  # Qwen2's q/k/v biases are saved with the norm scales, and load back
        from safetensors.torch import load_file

        saved = load_file(str(qwen2_base["registry"].fetch(ref) / "norm_scales.safetensors"))
        assert set(saved) == set(bitfit_plan(trained).names)
        assert any(name.endswith("q_proj.bias") for name in saved)
    ids = qwen2_base["data"].eval["input_ids"][:2]
    mask = qwen2_base["data"].eval["attention_mask"][:2]
    with torch.no_grad():
        expected = trained.eval()(input_ids=ids, attention_mask=mask).logits
        got = loaded.model(input_ids=ids, attention_mask=mask).logits
        plain = load_artifact(str(qwen2_base["ref"]), registry=qwen2_base["registry"]).model(
            input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert (expected - plain).abs().max() > 1e-4  # the adapter really changes the model
