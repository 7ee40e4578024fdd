"""Live adapter operations: the base check, several adapters on one base, switching, detaching."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from llmstack.errors import ModelLoadError
from llmstack.models import (adapter_context, attach_adapter, check_adapter_base, describe_artifact, detach_adapter,
                             load_artifact)

REPO = Path(__file__).resolve().parents[3]


# --------------------------------------------------------------------------- the base check


def test_adapter_on_another_registry_base_is_refused_naming_both(world: dict[str, Any], adapter_refs: Any,
                                                                 ft: Any) -> None:
    registry = world["registry"]
    other, _ = ft.make_base(registry, "other-base", seed=1)
    adapter = describe_artifact(adapter_refs("lora"), registry=registry)
    check_adapter_base(adapter, describe_artifact(world["ref"], registry=registry))  # its own base: fine
    served_adapter = describe_artifact(adapter_refs("bitfit"), registry=registry)
    check_adapter_base(adapter, served_adapter)  # beside another adapter of the same base: it runs on that base
    with pytest.raises(ModelLoadError, match=rf"ad-lora@v1 was trained on base@v1 \(its lineage\), not {other}"):
        check_adapter_base(adapter, describe_artifact(other, registry=registry))


def test_adapter_on_the_merged_model_is_refused(world: dict[str, Any], adapter_refs: Any) -> None:
    """Issue #12: serving an adapter on the model it was already merged into applies it twice."""
    from llmstack.finetune import merge_adapter

    registry = world["registry"]
    merged = merge_adapter(registry, adapter_refs("lora"), name="merged-lora")
    adapter = describe_artifact("ad-lora@v1", registry=registry)
    with pytest.raises(ModelLoadError, match=rf"trained on base@v1 \(its lineage\), not {merged}"):
        check_adapter_base(adapter, describe_artifact(merged, registry=registry))


def test_qlora_adapter_needs_its_nf4_base_not_the_float_model(world: dict[str, Any], adapter_refs: Any) -> None:
    registry = world["registry"]
    adapter = describe_artifact(adapter_refs("qlora"), registry=registry)
    check_adapter_base(adapter, adapter.base)
    with pytest.raises(ModelLoadError, match=r"ad-qlora@v1 \(qlora\) was trained on base@v1 \(quantized to NF4 on "
                                             r"load\), not on base@v1 \(a model\)"):
        check_adapter_base(adapter, describe_artifact(world["ref"], registry=registry))


def test_directory_base_is_checked_by_weight_hash(world: dict[str, Any], adapter_refs: Any, ft: Any,
                                                  tmp_path: Path) -> None:
    import shutil

    registry = world["registry"]
    adapter = describe_artifact(adapter_refs("bitfit"), registry=registry)
    same = shutil.copytree(registry.fetch(world["ref"]), tmp_path / "same")
    check_adapter_base(adapter, describe_artifact(str(same)))
    third, _ = ft.make_base(registry, "third-base", seed=2)
    other = shutil.copytree(registry.fetch(third), tmp_path / "other")
    with pytest.raises(ModelLoadError, match=r"trained on base@v1 \(its lineage\), and the weights in .*other are "
                                             r"not that model's"):
        check_adapter_base(adapter, describe_artifact(str(other)))
    with pytest.raises(ModelLoadError, match="is a model, not an adapter"):
        check_adapter_base(describe_artifact(world["ref"], registry=registry), adapter)


def _quickstart_lineage(url: str) -> Any:
    """What `make quickstart` registers: base -> LoRA -> merged `tiny-lm@v1` -> int8 `tiny-lm@v2` (production)."""
    from llmstack.finetune import merge_adapter
    from llmstack.models import register_model
    from llmstack.quantize import quantize
    from llmstack.registry import Registry
    from llmstack.serve._testing import lora_adapter, tiny_model

    registry = Registry(url)
    model, tokenizer = tiny_model(seed=0)
    base = register_model(registry, "tiny-lm-base", model, tokenizer, kind="model")
    with tempfile.TemporaryDirectory() as tmp:
        lora_adapter(model, tmp, seed=1)
        adapter = registry.register("tiny-lm-lora", tmp, kind="adapter", parents=[str(base)])
    merged = merge_adapter(registry, adapter, name="tiny-lm")
    registry.promote(merged, alias="production", force=True, reason="test: the quickstart's lineage")
    quantized = quantize({"evaluation": {"enabled": False}}, source=str(merged), method="int8-dynamic", registry=registry,
                         name="tiny-lm")
    registry.promote(quantized.ref, alias="production", force=True, reason="test: the quickstart's lineage")
    return registry


def test_shipped_lora_config_serves_the_adapter_on_the_base_it_was_trained_on(tmp_path: Path) -> None:
    """Issue #12: serve_configs/tiny-lora.yaml applied tiny-lm-lora (trained on tiny-lm-base) to tiny-lm@production,
    the merged (and quantized) model it is already part of."""
    registry = _quickstart_lineage(str(tmp_path / "registry"))
    config = yaml.safe_load((REPO / "serve_configs" / "tiny-lora.yaml").read_text())
    args = config["applications"][0]["args"]
    served = describe_artifact(args["model"], registry=registry)
    assert args["adapters"]
    for entry in args["adapters"]:
        check_adapter_base(describe_artifact(entry.partition("=")[2] or entry, registry=registry), served)


# --------------------------------------------------------------------------- several adapters on one base


def _ids(world: dict[str, Any]) -> Any:
    return world["data"].eval["input_ids"][:2]


def _out(model: Any, world: dict[str, Any]) -> Any:
    with torch.no_grad():
        return model(input_ids=_ids(world)).logits


def test_two_adapters_switch_and_the_base_stays_untouched(world: dict[str, Any], adapter_refs: Any) -> None:
    registry = world["registry"]
    alone = {m: _out(load_artifact(adapter_refs(m), registry=registry).model, world) for m in ("lora", "bitfit")}
    base = load_artifact(world["ref"], registry=registry).model
    plain = _out(base, world)
    model = attach_adapter(base, describe_artifact("ad-lora@v1", registry=registry), "lora")
    model = attach_adapter(model, describe_artifact("ad-bitfit@v1", registry=registry), "bitfit")
    torch.testing.assert_close(_out(model, world), plain)  # at rest: the base (no "default" attached)
    for _ in range(2):  # switching back and forth leaves nothing behind
        for name in ("lora", "bitfit", None):
            with adapter_context(model, name):
                torch.testing.assert_close(_out(model, world), plain if name is None else alone[name])
    assert (alone["lora"] - alone["bitfit"]).abs().max() > 1e-3 and (alone["lora"] - plain).abs().max() > 1e-3
    model = detach_adapter(model, "lora")
    with adapter_context(model, "bitfit"):
        torch.testing.assert_close(_out(model, world), alone["bitfit"])
    model = detach_adapter(model, "bitfit")
    assert not any("lora" in name for name, _ in model.named_parameters())
    torch.testing.assert_close(_out(model, world), plain)


def test_default_adapter_is_active_at_rest_and_none_is_the_plain_base(world: dict[str, Any],
                                                                      adapter_refs: Any) -> None:
    registry = world["registry"]
    adapter_refs("dora")
    plain = _out(load_artifact(world["ref"], registry=registry).model, world)
    dora = _out(load_artifact("ad-dora@v1", registry=registry).model, world)
    loaded = load_artifact(adapter_refs("bitfit"), registry=registry)  # attached as "default"
    bitfit = _out(loaded.model, world)
    model = attach_adapter(loaded.model, describe_artifact("ad-dora@v1", registry=registry), "dora")
    torch.testing.assert_close(_out(model, world), bitfit)
    with adapter_context(model, None):
        torch.testing.assert_close(_out(model, world), plain)
    with adapter_context(model, "dora"):
        torch.testing.assert_close(_out(model, world), dora)
    with adapter_context(model, "default"):
        torch.testing.assert_close(_out(model, world), bitfit)
    torch.testing.assert_close(_out(model, world), bitfit)


def test_qlora_adapter_attaches_to_its_nf4_base(world: dict[str, Any], adapter_refs: Any, runs: Any,
                                                helpers: Any) -> None:
    registry = world["registry"]
    adapter = describe_artifact(adapter_refs("qlora"), registry=registry)
    nf4 = load_artifact(adapter.base).model
    plain = _out(nf4, world)
    check_adapter_base(adapter, adapter.base)
    model = attach_adapter(nf4, adapter, "q")
    with adapter_context(model, "q"):
        torch.testing.assert_close(helpers.logits(model, world), helpers.logits(helpers.trained_model(runs("qlora")),
                                                                                world), rtol=1e-5, atol=1e-5)
    with adapter_context(model, None):
        torch.testing.assert_close(_out(model, world), plain)


def test_attach_and_switch_errors_name_the_problem(world: dict[str, Any], adapter_refs: Any) -> None:
    registry = world["registry"]
    base = load_artifact(world["ref"], registry=registry).model
    with pytest.raises(ModelLoadError, match="expects an adapter Artifact"):
        attach_adapter(base, describe_artifact(world["ref"], registry=registry), "x")
    model = attach_adapter(base, describe_artifact(adapter_refs("lora"), registry=registry), "one")
    with pytest.raises(ModelLoadError, match="already attached as 'one'"):
        attach_adapter(model, describe_artifact("ad-lora@v1", registry=registry), "one")
    with pytest.raises(ModelLoadError, match="no adapter is attached as 'two'; attached: one"):
        adapter_context(model, "two")
    with pytest.raises(ModelLoadError, match="no adapter is attached as 'two'"):
        detach_adapter(model, "two")
