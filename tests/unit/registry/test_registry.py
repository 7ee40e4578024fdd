"""Registry behaviour on every backend: local directory, memory:// and a real S3 server (moto)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from llmstack.errors import AliasConflictError, ArtifactNotFoundError, IntegrityError, RegistryError
from llmstack.registry import ArtifactRef, Manifest, Registry, format_history, format_list, format_manifest


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMSTACK_CACHE", str(tmp_path / "cache"))


@pytest.fixture(params=["local", "memory", "s3"])
def any_registry(request: pytest.FixtureRequest, tmp_path: Path) -> Registry:
    if request.param == "local":
        return Registry(str(tmp_path / "registry"))
    if request.param == "memory":
        return Registry(f"memory://reg-{uuid.uuid4().hex}")
    s3 = request.getfixturevalue("s3_server")
    return Registry(f"s3://{s3['bucket']}/reg-{uuid.uuid4().hex}", storage_options=s3["storage_options"])


def make_source(root: Path, tag: str = "a", *, big: int = 0) -> Path:
    """A small model-like directory whose contents identify ``tag``."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({"tag": tag}))
    (root / "model.safetensors").write_bytes(tag.encode() * (1000 + big))
    (root / "tokenizer").mkdir(exist_ok=True)
    (root / "tokenizer" / "tokenizer.json").write_text(json.dumps({"tag": tag}))
    return root


def test_register_resolve_list_show(any_registry: Registry, tmp_path: Path) -> None:
    reg = any_registry
    assert reg.list() == [] and reg.names() == []
    v1 = reg.register("tiny", make_source(tmp_path / "a", "a"), kind="model", config={"lr": 1e-3},
                      metrics={"loss": 2.5}, data_fingerprint="f" * 64)
    v2 = reg.register("tiny", make_source(tmp_path / "b", "b"), kind="quantized", parents=["tiny"])
    assert (str(v1), str(v2)) == ("tiny@v1", "tiny@v2")
    assert reg.resolve("tiny") == v2 and reg.resolve("tiny@latest") == v2 and reg.resolve("tiny@v1") == v1
    assert reg.resolve(v1) == v1
    assert reg.names() == ["tiny"]
    assert [m.ref for m in reg.list()] == [v1, v2]

    m1, m2 = reg.manifest("tiny@v1"), reg.manifest(v2)
    assert isinstance(m1, Manifest) and m1.kind == "model" and m1.config == {"lr": 1e-3}
    assert m1.metrics == {"loss": 2.5} and m1.data_fingerprint == "f" * 64
    assert set(m1.files) == {"config.json", "model.safetensors", "tokenizer/tokenizer.json"}
    assert m1.files["model.safetensors"]["size"] == 1000 and len(m1.files["model.safetensors"]["sha256"]) == 64
    assert "torch" in m1.library_versions and "python" in m1.library_versions
    assert m2.parents == ["tiny@v1"]  # the unqualified parent was pinned to a concrete version
    assert m1.to_dict()["ref"] == "tiny@v1"

    shown = reg.show("tiny@v1")
    assert shown["ref"] == "tiny@v1" and shown["aliases"] == []
    assert "model.safetensors" in format_manifest(shown)
    assert "tiny@v2" in format_list(reg.list())

    local = reg.fetch("tiny@v1")
    assert json.loads((local / "config.json").read_text()) == {"tag": "a"}
    assert (local / "tokenizer" / "tokenizer.json").is_file()
    reg.verify("tiny@v2")


def test_not_found_messages_list_what_exists(any_registry: Registry, tmp_path: Path) -> None:
    reg = any_registry
    with pytest.raises(ArtifactNotFoundError, match="registered names: none"):
        reg.resolve("ghost")
    reg.register("tiny", make_source(tmp_path / "a"), kind="model")
    with pytest.raises(ArtifactNotFoundError, match="v1"):
        reg.resolve("tiny@v7")
    with pytest.raises(ArtifactNotFoundError, match="alias tiny@staging"):
        reg.resolve("tiny@staging")
    with pytest.raises(RegistryError):
        reg.resolve("../tiny")


def test_tampered_missing_and_extra_files_caught_by_verify(any_registry: Registry, tmp_path: Path) -> None:
    reg = any_registry
    ref = reg.register("tiny", make_source(tmp_path / "a"), kind="model")
    reg.verify(ref)
    store, upload = reg._store, reg.manifest(ref).upload_id
    prefix = f"tiny/objects/{upload}"
    store.write(f"{prefix}/model.safetensors", b"evil" * 250)  # same size, different bytes
    store.delete_tree(f"{prefix}/tokenizer")
    store.write(f"{prefix}/payload.pkl", b"\x80\x04")
    with pytest.raises(IntegrityError) as info:
        reg.verify(ref)
    problems = info.value.files  # type: ignore[attr-defined]
    assert problems["model.safetensors"].startswith("sha256 mismatch")
    assert problems["tokenizer/tokenizer.json"] == "missing"
    assert "unexpected" in problems["payload.pkl"]
    assert "model.safetensors" in str(info.value)
    with pytest.raises(IntegrityError, match="model.safetensors"):
        reg.fetch(ref)  # nothing loads tampered weights
    with pytest.raises(IntegrityError):
        reg.promote(ref, force=True)  # nor does a tampered version reach production
    assert reg.aliases("tiny") == {}


def test_interrupted_upload_is_invisible_and_later_register_works(
        any_registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reg = any_registry
    real = Registry._upload_file
    calls = {"n": 0}

    def failing(self: Registry, path: Path, key: str, bar: object = None) -> dict:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("connection reset while uploading")
        return real(self, path, key, bar)

    monkeypatch.setattr(Registry, "_upload_file", failing)
    with pytest.raises(RegistryError, match="connection reset"):
        reg.register("tiny", make_source(tmp_path / "a"), kind="model")
    monkeypatch.setattr(Registry, "_upload_file", real)
    assert reg.list() == [] and reg.names() == []
    with pytest.raises(ArtifactNotFoundError):
        reg.resolve("tiny")
    assert reg._store.find("tiny/objects") == []  # the partial upload was cleaned up
    ref = reg.register("tiny", make_source(tmp_path / "b", "b"), kind="model")
    assert ref == ArtifactRef("tiny", 1)
    reg.verify(ref)


def test_crash_before_manifest_and_partial_manifest_are_not_versions(any_registry: Registry,
                                                                      tmp_path: Path) -> None:
    """A writer killed mid-way leaves files without a manifest, or (on a non-atomic store) half a manifest."""
    reg = any_registry
    v1 = reg.register("tiny", make_source(tmp_path / "a"), kind="model")
    reg._store.write("tiny/objects/20000101T000000Z-deadbeef/model.safetensors", b"orphan")
    reg._store.write("tiny/versions/v000002.json", b'{"name": "tiny", "version": 2, "kind": "mo')
    reg._store.write("tiny/versions/v000003.json", json.dumps({"name": "tiny", "version": 3}).encode())
    assert [m.ref for m in reg.list()] == [v1]
    assert reg.resolve("tiny") == v1
    with pytest.raises(IntegrityError, match="not valid JSON"):
        reg.manifest("tiny@v2")
    with pytest.raises(IntegrityError, match="incomplete"):
        reg.fetch("tiny@v3")
    v4 = reg.register("tiny", make_source(tmp_path / "b", "b"), kind="model")
    assert v4.version == 4 and reg.resolve("tiny") == v4
    assert reg.gc(older_than_s=60) == ["tiny/objects/20000101T000000Z-deadbeef"]
    reg.verify(v1)
    reg.verify(v4)


def test_register_refuses_pickles_and_bad_input(any_registry: Registry, tmp_path: Path) -> None:
    reg = any_registry
    src = make_source(tmp_path / "a")
    (src / "pytorch_model.bin").write_bytes(b"\x80\x04")
    (src / "training_args.pt").write_bytes(b"\x80\x04")
    with pytest.raises(RegistryError, match=r"pytorch_model\.bin, training_args\.pt.*safetensors"):
        reg.register("tiny", src, kind="model")
    good = make_source(tmp_path / "b")
    with pytest.raises(RegistryError, match="unknown artifact kind 'weights'.*tokenizer, model"):
        reg.register("tiny", good, kind="weights")
    with pytest.raises(RegistryError, match="allowed"):
        reg.register("../escape", good, kind="model")
    with pytest.raises(RegistryError, match="not a directory"):
        reg.register("tiny", tmp_path / "missing", kind="model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RegistryError, match="no files"):
        reg.register("tiny", tmp_path / "empty", kind="model")
    with pytest.raises(ArtifactNotFoundError):
        reg.register("tiny", good, kind="model", parents=["base@v1"])
    assert reg.list() == []


def test_aliases_compare_and_swap_and_history(any_registry: Registry, tmp_path: Path) -> None:
    reg = any_registry
    v1 = reg.register("tiny", make_source(tmp_path / "a"), kind="model")
    v2 = reg.register("tiny", make_source(tmp_path / "b", "b"), kind="model")
    reg.set_alias("tiny", "production", v1, expected=None)
    assert reg.aliases("tiny") == {"production": 1} and reg.resolve("tiny@production") == v1
    with pytest.raises(AliasConflictError, match="holds v1, expected nothing"):
        reg.set_alias("tiny", "production", 2, expected=None)
    with pytest.raises(AliasConflictError, match="expected v2"):
        reg.set_alias("tiny", "production", 2, expected=2)
    reg.set_alias("tiny", "production", "v2", expected=1, reason="better")
    reg.set_alias("tiny", "staging", "tiny@production")
    assert reg.aliases("tiny") == {"production": 2, "staging": 2}
    assert reg.show(v2)["aliases"] == ["production", "staging"]
    with pytest.raises(RegistryError, match="reserved"):
        reg.set_alias("tiny", "latest", 1)
    with pytest.raises(ArtifactNotFoundError):
        reg.set_alias("tiny", "production", 9)
    events = reg.history("tiny", "production")
    assert [(e["action"], e["from"], e["to"]) for e in events] == [("set", None, 1), ("set", 1, 2)]
    assert events[1]["reason"] == "better"
    assert len(reg.history("tiny")) == 3
    assert "tiny@production: v1 -> v2" in format_history(events)


def test_promote_rollback_history(any_registry: Registry, tmp_path: Path) -> None:
    from llmstack.errors import ValidationFailedError
    from llmstack.registry import validation_key

    reg = any_registry
    v1, v2, v3 = (reg.register("tiny", make_source(tmp_path / t, t), kind="model") for t in "abc")
    first = reg.promote(v1, reason="initial")  # nothing to compare against yet
    assert first["action"] == "promote" and first["from"] is None
    with pytest.raises(ValidationFailedError, match="no validation report against it"):
        reg.promote(v2)
    reg.annotate(v2, validation_key(v1), {"passed": False, "summary": "perplexity worse",
                                          "failed_checks": ["perplexity"], "baseline": "tiny@v1"})
    with pytest.raises(ValidationFailedError, match="failed: perplexity"):
        reg.promote(v2)
    reg.annotate(v2, validation_key(v1), {"passed": True, "summary": "ok", "baseline": "tiny@v1"})
    assert reg.annotations(v2)[validation_key(v1)]["passed"] is True
    ok = reg.promote(v2)
    assert (ok["action"], ok["from"], ok["to"], ok["report"]["passed"]) == ("promote", 1, 2, True)
    forced = reg.promote(v3, force=True, reason="hotfix")
    assert (forced["action"], forced["forced"], forced["report"]) == ("force-promote", True, None)
    with pytest.raises(RegistryError, match="already holds"):
        reg.promote(v3)
    assert reg.rollback("tiny", reason="bad canary")["to"] == 2
    assert reg.rollback("tiny")["to"] == 1
    with pytest.raises(RegistryError, match="no earlier version"):
        reg.rollback("tiny")
    assert reg.resolve("tiny@production") == v1
    actions = [(e["action"], e["from"], e["to"]) for e in reg.history("tiny")]
    assert actions == [("promote", None, 1), ("promote", 1, 2), ("force-promote", 2, 3),
                       ("rollback", 3, 2), ("rollback", 2, 1)]
    with pytest.raises(ArtifactNotFoundError):
        reg.promote("tiny@v42")


def test_annotations_do_not_touch_manifest(any_registry: Registry, tmp_path: Path) -> None:
    reg = any_registry
    ref = reg.register("tiny", make_source(tmp_path / "a"), kind="model")
    before = reg._store.read("tiny/versions/v000001.json")
    reg.annotate(ref, "validation", {"passed": True, "p": float("nan")})
    reg.annotate("tiny", "notes", {"text": "hello"})
    assert reg._store.read("tiny/versions/v000001.json") == before
    assert reg.annotations(ref) == {"validation": {"passed": True, "p": "nan"}, "notes": {"text": "hello"}}
    with pytest.raises(RegistryError):
        reg.annotate(ref, "../x", {})
    reg.verify(ref)


def test_remote_fetch_cache_is_hash_checked(tmp_path: Path) -> None:
    reg = Registry(f"memory://reg-{uuid.uuid4().hex}")
    ref = reg.register("tiny", make_source(tmp_path / "a"), kind="model")
    first = reg.fetch(ref)
    assert str(first).startswith(str(tmp_path / "cache"))
    (first / "model.safetensors").write_bytes(b"x" * 1000)  # damaged cache copy
    again = reg.fetch(ref)
    assert again == first and (again / "model.safetensors").read_bytes() == b"a" * 1000


def test_default_location_and_pickling(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pickle

    monkeypatch.setenv("LLMSTACK_REGISTRY", str(tmp_path / "envreg"))
    reg = Registry()
    assert reg.url == str(tmp_path / "envreg")
    reg.register("tiny", make_source(tmp_path / "a"), kind="model")
    clone = pickle.loads(pickle.dumps(reg))
    assert clone.url == reg.url and clone.resolve("tiny") == ArtifactRef("tiny", 1)


def test_fetch_refuses_a_version_holding_files_outside_its_manifest(any_registry: Registry, tmp_path: Path) -> None:
    """A file dropped into a version's folder is flagged by verify and never reaches a loader (issue #12)."""
    reg = any_registry
    ref = reg.register("tiny", make_source(tmp_path / "a"), kind="model")
    prefix = f"tiny/objects/{reg.manifest(ref).upload_id}"
    reg._store.write(f"{prefix}/extra/tokenizer.json", b"{}")
    if reg._store.local_path(prefix) is not None:  # the stored folder itself is handed out: refused
        with pytest.raises(IntegrityError, match=r"extra/tokenizer.json \(not in the manifest\)"):
            reg.fetch(ref)
    else:  # a download copies the manifest's files only
        assert not (reg.fetch(ref) / "extra").exists()
    reg._store.delete_tree(f"{prefix}/extra")
    assert (reg.fetch(ref) / "model.safetensors").is_file()


def test_remote_fetch_cache_with_a_stray_file_is_fetched_again(tmp_path: Path) -> None:
    reg = Registry(f"memory://reg-{uuid.uuid4().hex}")
    ref = reg.register("tiny", make_source(tmp_path / "a"), kind="model")
    first = reg.fetch(ref)
    (first / "tokenizer.json").write_text("{}")  # dropped into the cache copy
    again = reg.fetch(ref)
    assert again == first and not (again / "tokenizer.json").exists()


def test_hash_memo_sees_a_rewrite_whose_size_and_mtime_were_restored(tmp_path: Path) -> None:
    import os
    import time

    from llmstack.registry._registry import hash_file

    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"a" * 64)
    before = weights.stat()
    first = hash_file(weights, memo=True)
    time.sleep(0.05)  # past the filesystem's timestamp granularity
    weights.write_bytes(b"b" * 64)  # same size
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))  # mtime restored
    assert weights.stat().st_mtime_ns == before.st_mtime_ns
    assert hash_file(weights, memo=True) != first
