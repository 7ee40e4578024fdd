"""What an engine serves: the base model (loaded) and the adapters it may load on it (specs, loaded lazily)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmstack.errors import ModelLoadError

if TYPE_CHECKING:
    from llmstack.registry import Registry


@dataclass
class AdapterSpec:
    """A LoRA adapter served on the engine's base model under ``id``."""

    id: str  # served model id (the registry name, or the directory name)
    source: str  # registry ref (pinned to name@vN), local directory or fsspec URL
    identity: str  # cache key part: never shared by two different adapters
    registry: Any = None
    storage_options: dict[str, Any] = field(default_factory=dict)

    def directory(self) -> Path:
        """A local directory holding ``adapter_config.json`` and the adapter's safetensors."""
        path = Path(self.source).expanduser()
        if path.is_dir():
            return path
        if "://" in self.source:
            return _fetch_url_dir(self.source, self.storage_options)
        return Path(self.registry.fetch(self.source))


def _fetch_url_dir(url: str, storage_options: dict[str, Any]) -> Path:
    """Copy a remote directory (any fsspec URL) into a local cache keyed by the URL."""
    import tempfile

    import fsspec

    target = Path(tempfile.gettempdir()) / "llmstack-adapters" / hashlib.sha256(url.encode()).hexdigest()[:16]
    if not (target / "adapter_config.json").is_file():
        fs, root = fsspec.core.url_to_fs(url, **storage_options)
        target.mkdir(parents=True, exist_ok=True)
        for remote in fs.find(root):
            rel = remote[len(root.rstrip("/")) + 1:]
            dest = target / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            fs.get(remote, str(dest))
    if not (target / "adapter_config.json").is_file():
        raise ModelLoadError(f"{url} holds no adapter_config.json: not a peft adapter")
    return target


def dir_identity(path: Path) -> str:
    """Content identity of a local directory (names, sizes, mtimes): changes when files change."""
    digest = hashlib.sha256(str(path.resolve()).encode())
    for item in sorted(path.rglob("*")):
        if item.is_file():
            stat = item.stat()
            digest.update(f"{item.relative_to(path)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return "dir:" + digest.hexdigest()[:16]


def _short_name(source: str) -> str:
    from llmstack.registry import ArtifactRef

    if "://" not in source and not Path(source).expanduser().exists() and ArtifactRef.looks_like(source):
        return ArtifactRef.parse(source)[0]
    return Path(source.rstrip("/")).name


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    model_id: str  # served id
    root: str  # name@vN or the directory
    identity: str  # model-version part of cache keys
    adapter_dir: Path | None = None  # set when the served model is itself an adapter on a base
    source: str | None = None  # what the config named (e.g. name@production), accepted as a model id


def load_served_model(source: str, *, registry: Registry | None = None, dtype: str = "float32") -> LoadedModel:
    """Load what ``source`` names for serving: a full, merged, quantized model or an adapter on its base.

    Registry refs dispatch on the manifest ``kind``; a local directory with ``adapter_config.json``
    is an adapter whose base comes from ``base_model_name_or_path``.
    """
    loaded = _load_served_model(source, registry=registry, dtype=dtype)
    loaded.source = source
    return loaded


def _load_served_model(source: str, *, registry: Registry | None = None, dtype: str = "float32") -> LoadedModel:
    from llmstack.models import load_model, load_tokenizer
    from llmstack.registry import ArtifactRef, Registry

    path = Path(source).expanduser()
    if path.is_dir():
        if (path / "adapter_config.json").is_file():
            import json

            base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
            if not base:
                raise ModelLoadError(f"adapter {path} names no base model (base_model_name_or_path)")
            loaded = load_served_model(base, registry=registry, dtype=dtype)
            return LoadedModel(loaded.model, loaded.tokenizer, path.name, str(path),
                               f"{loaded.identity}+{dir_identity(path)}", adapter_dir=path)
        model, tokenizer = load_model(str(path), dtype=dtype)
        return LoadedModel(model, tokenizer, path.name, str(path), dir_identity(path))
    if not ArtifactRef.looks_like(source):
        raise ModelLoadError(f"model {source!r} is neither a local directory nor a registry reference (name@vN)")
    registry = registry or Registry()
    ref = registry.resolve(source)
    manifest = registry.manifest(ref)
    identity = f"{registry.url}::{ref}"
    if manifest.kind == "model":
        model, tokenizer = load_model(str(ref), registry=registry, dtype=dtype)
    elif manifest.kind == "quantized":
        from llmstack.quantize import load_quantized

        model, tokenizer = load_quantized(registry, ref)
    elif manifest.kind == "adapter":
        if not manifest.parents:
            raise ModelLoadError(f"adapter {ref} records no parent base model in its manifest")
        base = load_served_model(manifest.parents[0], registry=registry, dtype=dtype)
        directory = Path(registry.fetch(ref))
        tokenizer = base.tokenizer
        if (directory / "tokenizer.json").is_file():
            tokenizer = load_tokenizer(str(directory))
        return LoadedModel(base.model, tokenizer, ref.name, str(ref), f"{base.identity}+{identity}",
                           adapter_dir=directory)
    else:
        raise ModelLoadError(f"{ref} is a {manifest.kind!r} artifact; serve a model, adapter or quantized artifact")
    return LoadedModel(model, tokenizer, ref.name, str(ref), identity)


def resolve_adapters(entries: Iterable[str], *, registry: Registry | None,
                     storage_options: dict[str, Any] | None = None) -> list[AdapterSpec]:
    """Turn config entries (``ref``, ``path``, ``url`` or ``id=any of those``) into pinned specs."""
    from llmstack.registry import ArtifactRef, Registry

    specs: list[AdapterSpec] = []
    for entry in entries:
        served_id, sep, source = entry.partition("=")
        if not sep:
            served_id, source = "", entry
        path = Path(source).expanduser()
        if path.is_dir():
            if not (path / "adapter_config.json").is_file():
                raise ModelLoadError(f"adapter directory {path} has no adapter_config.json")
            spec = AdapterSpec(served_id or path.name, str(path), dir_identity(path))
        elif "://" in source:
            spec = AdapterSpec(served_id or _short_name(source), source, "url:" + source,
                               storage_options=dict(storage_options or {}))
        elif ArtifactRef.looks_like(source):
            registry = registry or Registry()
            ref = registry.resolve(source)
            kind = registry.manifest(ref).kind
            if kind != "adapter":
                raise ModelLoadError(f"{ref} is a {kind!r} artifact, not an adapter")
            spec = AdapterSpec(served_id or ref.name, str(ref), f"{registry.url}::{ref}", registry=registry)
        else:
            raise ModelLoadError(f"adapter {source!r} is neither a registry reference, a directory nor a URL")
        if any(s.id == spec.id for s in specs):
            raise ModelLoadError(f"two adapters are served as {spec.id!r}; give one another id with id=source")
        specs.append(spec)
    return specs

