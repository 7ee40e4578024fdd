"""LoRA targets for every supported architecture (GPT-2's ``Conv1D`` included), and a step that trains them."""

from __future__ import annotations

from typing import Any

import pytest

from llmstack.config import FinetuneMethodConfig
from llmstack.errors import ConfigError
from llmstack.finetune.methods import apply_method, linear_module_names, resolve_target_modules
from llmstack.serve._testing import ARCHITECTURES

SEPARATE = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
DECODER_LINEARS = {"llama": SEPARATE, "qwen2": SEPARATE, "mistral": SEPARATE, "gemma3": SEPARATE,
                   "phi3": ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"],  # fused projections
                   "gpt2": ["c_attn", "c_fc", "c_proj"]}  # transformers' Conv1D, weights stored transposed


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from llmstack.data import train_tokenizer
    from llmstack.serve._testing import DOCS

    return train_tokenizer(DOCS, vocab_size=320)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_default_targets_wrap_every_decoder_linear_and_train(architecture: str, method: str, tokenizer: Any) -> None:
    import torch

    from llmstack.serve._testing import tiny_causal_lm

    model = tiny_causal_lm(architecture, tokenizer)
    assert resolve_target_modules(model, None) == DECODER_LINEARS[architecture]
    assert "lm_head" in linear_module_names(model, decoder_only=False)  # exists, never a default target
    peft_model = apply_method(model, method, FinetuneMethodConfig(method=method, rank=4))
    wrapped = {n.rsplit(".", 1)[-1] for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == set(DECODER_LINEARS[architecture])
    before = peft_model(input_ids=torch.tensor([[1, 2, 3]])).logits

    ids = torch.tensor([tokenizer("line 3: the value of x is 21 and y is 9.")["input_ids"]] * 2)
    peft_model.train()
    peft_model(input_ids=ids, labels=ids).loss.backward()
    trained = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)  # the base stays frozen
    lora_b = [p for n, p in trained.items() if "lora_B" in n]
    assert lora_b and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b)
    optimizer = torch.optim.SGD(list(trained.values()), lr=1.0)
    optimizer.step()
    peft_model.eval()
    assert not torch.allclose(peft_model(input_ids=torch.tensor([[1, 2, 3]])).logits, before)  # the step counts


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_absent_target_names_list_the_linear_layers_that_exist(architecture: str, tokenizer: Any) -> None:
    from llmstack.serve._testing import tiny_causal_lm

    model = tiny_causal_lm(architecture, tokenizer)
    absent = "q_proj" if architecture in ("phi3", "gpt2") else "c_attn"
    with pytest.raises(ConfigError) as info:
        resolve_target_modules(model, [absent])
    message = str(info.value)
    assert "lora.target_modules:" in message and f"'{absent}' does not exist" in message
    for name in DECODER_LINEARS[architecture] + ["lm_head"]:
        assert name in message
