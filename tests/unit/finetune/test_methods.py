"""Each method on the shared loop (in-process): what trains, what is frozen, and that it learns."""

from __future__ import annotations

import sys

import pytest

from llmstack.config import FinetuneConfig, FinetuneMethodConfig, load_config
from llmstack.errors import ConfigError, ResourceError
from llmstack.finetune import finetune_lora
from llmstack.finetune.methods import (apply_method, check_bitsandbytes, count_trainable, linear_module_names,
                                       norm_parameter_names, resolve_target_modules)

DECODER_LINEARS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def _fresh(base):
    from llmstack.models import load_artifact

    return load_artifact(str(base["ref"]), registry=base["registry"]).model


def test_default_targets_are_every_decoder_linear(base) -> None:
    model = _fresh(base)
    assert resolve_target_modules(model, None) == DECODER_LINEARS
    assert "lm_head" in linear_module_names(model, decoder_only=False)  # exists, but not a default target
    peft_model = apply_method(model, "lora", FinetuneMethodConfig(rank=4))
    wrapped = {n.rsplit(".", 1)[-1] for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == set(DECODER_LINEARS)


def test_unknown_target_modules_list_those_that_exist(base) -> None:
    with pytest.raises(ConfigError) as info:
        resolve_target_modules(_fresh(base), ["q_proj", "qkv", "fc1"])
    message = str(info.value)
    assert "'qkv', 'fc1' do not exist" in message
    for name in DECODER_LINEARS + ["lm_head"]:
        assert name in message


@pytest.mark.parametrize("rank", [0, -3])
def test_rank_must_be_positive(base, rank: int) -> None:
    with pytest.raises(ConfigError, match=f"lora.rank: must be >= 1, got {rank}"):
        load_config(FinetuneConfig, {"lora": {"rank": rank}})
    with pytest.raises(ConfigError, match="lora.rank"):  # refused before any data, model or cluster work
        finetune_lora({"lora": {"rank": rank}}, base=str(base["ref"]), registry=base["registry"])


def test_bitfit_is_norm_scale_tuning(base) -> None:
    model = apply_method(_fresh(base), "bitfit", FinetuneMethodConfig(method="bitfit"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(norm_parameter_names(model))
    assert len(trainable) == 2 * model.config.num_hidden_layers + 1  # two RMSNorms per layer + the final one
    assert count_trainable(model)[0] == len(trainable) * model.config.hidden_size


def test_full_trains_everything(base) -> None:
    model = apply_method(_fresh(base), "full", FinetuneMethodConfig(method="full"))
    trainable, total = count_trainable(model)
    assert trainable == total


@pytest.mark.parametrize("method", ["lora", "qlora", "dora", "full"])
def test_each_method_lowers_held_out_answer_loss(base, trained, method: str) -> None:
    run = trained(method)
    assert run["after"] < run["before"] - 0.02, (method, run["before"], run["after"])
    from llmstack.finetune.lora import load_trainable

    stored = load_trainable(run["checkpoint"])
    if method == "full":
        assert len(stored) == len(list(_fresh(base).state_dict()))
    else:  # adapter checkpoints hold the trainable tensors only
        assert stored and all("lora_" in name for name in stored)


def test_bitfit_changes_only_norm_scales(base, trained) -> None:
    run = trained("bitfit")
    from llmstack.finetune.lora import load_trainable

    stored = load_trainable(run["checkpoint"])
    original = dict(_fresh(base).named_parameters())
    assert set(stored) == set(norm_parameter_names(_fresh(base)))
    assert all(not (stored[name] == original[name].detach()).all() for name in stored)


def test_qlora_base_is_nf4(base) -> None:
    from llmstack.finetune.methods import base_artifact
    from llmstack.models import load_artifact

    model = load_artifact(base_artifact(str(base["ref"]), registry=base["registry"], method="qlora")).model
    kinds = {type(m).__name__ for m in model.modules()}
    assert "Linear4bit" in kinds
    quant = model.model.layers[0].self_attn.q_proj.weight.quant_state
    assert quant.quant_type == "nf4" and quant.nested  # double quantization


def test_qlora_base_lets_go_of_the_fp32_weights_file(base) -> None:
    """Nothing of the loaded NF4 base may still view the fp32 safetensors mmap (it kept ~4x the NF4
    bytes resident: every page read while quantizing)."""
    import gc
    from pathlib import Path

    from llmstack.finetune.methods import base_artifact
    from llmstack.models import describe_artifact, load_artifact

    weights = str(Path(describe_artifact(str(base["ref"]), registry=base["registry"]).directory).resolve())

    def mapped() -> bool:
        gc.collect()
        return weights in Path("/proc/self/maps").read_text()

    model = load_artifact(base_artifact(str(base["ref"]), registry=base["registry"], method="qlora")).model
    assert not mapped()
    fp32 = load_artifact(base_artifact(str(base["ref"]), registry=base["registry"], method="lora")).model
    assert mapped()  # the check can see a mapping: the fp32 base keeps viewing its file
    del fp32, model


def test_qlora_without_bitsandbytes_says_why(base, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    with pytest.raises(ResourceError, match="qlora needs bitsandbytes.*cannot be imported"):
        check_bitsandbytes("cpu")
    with pytest.raises(ResourceError, match="bitsandbytes"):
        finetune_lora({"lora": {"method": "qlora"}}, base=str(base["ref"]), registry=base["registry"])


def test_qlora_on_a_device_bitsandbytes_cannot_use(base) -> None:
    with pytest.raises(ResourceError, match="cannot run 4-bit NF4 quantization on meta"):
        check_bitsandbytes("meta")


def test_qlora_with_fsdp_is_refused(base) -> None:
    with pytest.raises(ConfigError, match="qlora cannot shard 4-bit"):
        finetune_lora({"lora": {"method": "qlora"}, "scaling": {"strategy": "fsdp"}}, base=str(base["ref"]),
                      registry=base["registry"])


def test_qlora_still_backpropagates_through_the_nf4_base_after_an_eval_forward(base) -> None:
    """bitsandbytes' CPU inference repacking (no autograd) must not leak into training steps."""
    import torch

    from llmstack.finetune.methods import ModelFactory

    factory = ModelFactory(base["registry"], str(base["ref"]), "qlora", FinetuneMethodConfig(method="qlora", rank=4, dropout=0.0))
    batch = {k: v[:2] for k, v in base["data"].train.items()}

    def first_layer_grad(model):
        from llmstack.train.loop import causal_lm_loss

        model.train()
        causal_lm_loss(model, batch).backward()
        return next(p.grad for n, p in model.named_parameters() if "layers.0.self_attn.q_proj.lora_B" in n)

    expected = first_layer_grad(factory())
    model = factory()
    model.eval()
    with torch.no_grad():
        model(input_ids=batch["input_ids"])  # a periodic evaluation
    got = first_layer_grad(model)
    assert expected.abs().sum() > 0
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_full_fine_tune_registers_a_model_with_the_base_as_parent(base, trained) -> None:
    import torch

    from llmstack.config import FinetuneConfig
    from llmstack.finetune.lora import _register_full, load_trainable
    from llmstack.models import load_artifact

    run = trained("full")
    ref = _register_full(base["registry"], FinetuneConfig(name="full-ft"), run["factory"],
                         load_trainable(run["checkpoint"]), base["tokenizer"], base["ref"], {"eval_loss": run["after"]},
                         base["data"].fingerprint, {"method": "full"})
    manifest = base["registry"].manifest(ref)
    assert manifest.kind == "model" and manifest.parents == [str(base["ref"])]
    model = load_artifact(str(ref), registry=base["registry"]).model
    tuned = load_trainable(run["checkpoint"])
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(model.state_dict()[name], tuned[name])
    assert not torch.equal(tuned[name], _fresh(base).state_dict()[name])
