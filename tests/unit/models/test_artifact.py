"""describe_artifact / load_artifact: every kind fine-tuning and quantization produce, described once and loaded."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from llmstack.errors import ArtifactNotFoundError, IntegrityError, LLMStackError, ModelLoadError
from llmstack.models import Artifact, describe_artifact, load_artifact


def test_registry_alias_is_resolved_once_and_pinned(world: dict[str, Any]) -> None:
    registry, ref = world["registry"], world["ref"]
    artifact = describe_artifact("base@production", registry=registry)
    assert (artifact.kind, artifact.method, artifact.ref, artifact.base) == ("model", None, ref, None)
    assert artifact.source == "base@production" and artifact.name == "base"
    assert artifact.identity == f"{registry.url}::{ref}"
    assert artifact.directory == registry.fetch(ref)
    assert describe_artifact(artifact) is artifact  # an Artifact is never re-resolved
    assert describe_artifact(ref, registry=registry) == describe_artifact(str(ref), registry=registry)


def test_local_directory_identity_follows_its_files(world: dict[str, Any], tmp_path: Path) -> None:
    copy = shutil.copytree(world["registry"].fetch(world["ref"]), tmp_path / "copy")
    first = describe_artifact(str(copy))
    assert (first.kind, first.ref, first.name) == ("model", None, "copy")
    assert first.identity.startswith("dir:") and describe_artifact(copy).identity == first.identity
    (copy / "generation_config.json").write_text('{"do_sample": false}')
    assert describe_artifact(str(copy)).identity != first.identity
    other = shutil.copytree(copy, tmp_path / "other")
    assert describe_artifact(str(other)).identity != describe_artifact(str(copy)).identity


@pytest.mark.parametrize("method", ["lora", "dora", "bitfit", "qlora"])
def test_adapters_are_described_with_their_pinned_base(world: dict[str, Any], adapter_refs: Any, method: str) -> None:
    registry = world["registry"]
    adapter_refs(method)
    adapter = describe_artifact(f"ad-{method}", registry=registry)
    assert (adapter.kind, adapter.method, str(adapter.ref)) == ("adapter", method, f"ad-{method}@v1")
    assert adapter.base is not None and adapter.base.ref == world["ref"]
    assert adapter.identity == f"{adapter.base.identity}+{registry.url}::ad-{method}@v1"
    if method == "qlora":  # the NF4 base that training used, not the float model
        assert (adapter.base.kind, adapter.base.method, adapter.base.quantize_on_load) == ("quantized", "nf4", True)
        assert adapter.base.identity == f"{registry.url}::{world['ref']}+nf4"
    else:
        assert adapter.base == describe_artifact(world["ref"], registry=registry)


@pytest.mark.parametrize("method", ["lora", "dora", "bitfit", "qlora"])
def test_adapters_load_as_the_model_fine_tuning_left(world: dict[str, Any], runs: Any, adapter_refs: Any,
                                                     helpers: Any, method: str) -> None:
    adapter_refs(method)
    loaded = load_artifact(f"ad-{method}@v1", registry=world["registry"])
    assert loaded.artifact.kind == "adapter" and loaded.tokenizer is not None
    assert not loaded.model.training
    expected = helpers.logits(helpers.trained_model(runs(method)), world)
    torch.testing.assert_close(helpers.logits(loaded.model, world), expected, rtol=1e-5, atol=1e-5)
    plain = helpers.logits(load_artifact(world["ref"], registry=world["registry"]).model, world)
    assert (expected - plain).abs().max() > 1e-3  # the adapter really changes the model
    if method == "qlora":
        assert any(type(m).__name__ == "Linear4bit" for m in loaded.model.modules())


def test_quantized_version_is_described_and_rebuilt(world: dict[str, Any], helpers: Any) -> None:
    from llmstack.quantize import quantize, rebuild_quantized

    registry = world["registry"]
    result = quantize({"evaluation": {"enabled": False}}, source=str(world["ref"]), method="int8-dynamic", registry=registry,
                      name="base-int8")
    artifact = describe_artifact("base-int8", registry=registry)
    assert (artifact.kind, artifact.method, artifact.ref) == ("quantized", "int8-dynamic", result.ref)
    loaded = load_artifact(artifact)
    reference = rebuild_quantized(registry.fetch(result.ref))  # the backend's own rebuild, not through models
    torch.testing.assert_close(helpers.logits(loaded.model, world), helpers.logits(reference, world))
    directory = describe_artifact(str(registry.fetch(result.ref)))  # the same files as a plain directory
    assert (directory.kind, directory.method, directory.ref) == ("quantized", "int8-dynamic", None)


def test_tokenizer_versions_describe_but_do_not_load_as_models(world: dict[str, Any], tmp_path: Path) -> None:
    from llmstack.models import load_tokenizer

    world["tokenizer"].save_pretrained(str(tmp_path / "tok"))
    ref = world["registry"].register("tok", tmp_path / "tok", kind="tokenizer")
    assert describe_artifact(str(ref), registry=world["registry"]).kind == "tokenizer"
    assert len(load_tokenizer(str(ref), registry=world["registry"])) == len(world["tokenizer"])
    with pytest.raises(ModelLoadError, match="tok@v1 is a tokenizer, not a model"):
        load_artifact(ref, registry=world["registry"])


def test_bad_sources_say_what_was_received_and_what_is_accepted(world: dict[str, Any], tmp_path: Path) -> None:
    registry = world["registry"]
    with pytest.raises(ArtifactNotFoundError, match="base"):
        describe_artifact("base@v9", registry=registry)
    with pytest.raises(ModelLoadError, match="neither a registry artifact, a local directory"):
        describe_artifact("no-such-model", registry=registry)
    with pytest.raises(ModelLoadError, match=r"expected a registry reference.*got 3"):
        describe_artifact(3, registry=registry)  # type: ignore[arg-type]
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hi")
    with pytest.raises(ModelLoadError, match=r"holds notes.txt; expected config.json"):
        describe_artifact(str(tmp_path / "junk"))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "rows.jsonl").write_text("{}\n")
    data_ref = registry.register("rows", tmp_path / "data", kind="dataset")
    with pytest.raises(ModelLoadError, match="rows@v1 is a dataset, not a model"):
        describe_artifact(data_ref, registry=registry)
    with pytest.raises(ModelLoadError, match="not one of"):
        load_artifact(world["ref"], registry=registry, dtype="int3")


def test_a_file_outside_the_manifest_is_never_loaded(world: dict[str, Any], adapter_refs: Any) -> None:
    """Issue #12: a tokenizer.json dropped into an adapter's version folder was flagged by verify, yet loaded."""
    registry = world["registry"]
    adapter = adapter_refs("lora")
    stray = registry.fetch(adapter) / "tokenizer.json"
    stray.write_text('{"not": "a tokenizer"}')
    try:
        with pytest.raises(IntegrityError, match=r"tokenizer.json: unexpected file \(not in manifest\)"):
            registry.verify(adapter)
        with pytest.raises(IntegrityError, match=r"tokenizer.json \(not in the manifest\)") as info:
            load_artifact(adapter, registry=registry)
        assert isinstance(info.value, LLMStackError)
    finally:
        stray.unlink()
    assert load_artifact(adapter, registry=registry).tokenizer is not None


def test_adapter_directory_outside_the_registry_finds_its_recorded_base(world: dict[str, Any], adapter_refs: Any,
                                                                        helpers: Any, tmp_path: Path) -> None:
    registry = world["registry"]
    copy = shutil.copytree(registry.fetch(adapter_refs("bitfit")), tmp_path / "bitfit-copy")
    artifact = describe_artifact(str(copy), registry=registry)
    assert (artifact.kind, artifact.method, artifact.ref, artifact.base.ref) == ("adapter", "bitfit", None,
                                                                                world["ref"])
    from_dir = helpers.logits(load_artifact(artifact).model, world)
    from_registry = helpers.logits(load_artifact("ad-bitfit@v1", registry=registry).model, world)
    torch.testing.assert_close(from_dir, from_registry)


def test_fsspec_url_of_an_adapter_directory(world: dict[str, Any], adapter_refs: Any, helpers: Any) -> None:
    import fsspec

    registry = world["registry"]
    fs = fsspec.filesystem("memory")
    for path in registry.fetch(adapter_refs("lora")).iterdir():
        fs.pipe(f"/adapters/lora/{path.name}", path.read_bytes())
    artifact = describe_artifact("memory://adapters/lora", registry=registry)
    assert (artifact.kind, artifact.method, artifact.source) == ("adapter", "lora", "memory://adapters/lora")
    assert artifact.name == "lora" and artifact.base.ref == world["ref"]
    again = describe_artifact("memory://adapters/lora", registry=registry)
    assert again.directory == artifact.directory and again.identity == artifact.identity  # one copy per content
    remote = sorted(Path(p).name for p in fs.ls("/adapters/lora", detail=False))
    assert sorted(p.name for p in artifact.directory.iterdir()) == remote  # exactly the remote files
    torch.testing.assert_close(helpers.logits(load_artifact(artifact).model, world),
                               helpers.logits(load_artifact("ad-lora@v1", registry=registry).model, world))


def test_an_adapter_loads_on_a_base_offered_in_place_of_its_own(world: dict[str, Any], adapter_refs: Any,
                                                                  tmp_path: Path) -> None:
    registry = world["registry"]
    adapter_refs("bitfit")
    same = shutil.copytree(registry.fetch(world["ref"]), tmp_path / "same-weights")
    on_copy = load_artifact("ad-bitfit@v1", registry=registry, base=str(same))
    assert on_copy.artifact.base.directory == same and on_copy.ref == registry.resolve("ad-bitfit@v1")
    own = load_artifact("ad-bitfit@v1", registry=registry)
    assert isinstance(own.artifact, Artifact) and own.label == "ad-bitfit@v1"
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(on_copy.model(ids).logits, own.model(ids).logits)
    with pytest.raises(ModelLoadError, match="base@v1 is a model, not an adapter; only adapters load on another base"):
        load_artifact("base@v1", registry=registry, base=str(same))
