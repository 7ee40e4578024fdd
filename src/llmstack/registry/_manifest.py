"""The manifest: everything known about one immutable registry version."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from llmstack.errors import IntegrityError, RegistryError
from llmstack.registry._refs import ArtifactRef

KINDS = ("tokenizer", "model", "adapter", "quantized", "dataset")
MANIFEST_FORMAT = 1
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


@dataclass
class Manifest:
    """One complete registry version. Written last: if it exists, every file it lists was uploaded.

    Attributes:
        ref: the concrete version (``name@vN``).
        kind: tokenizer, model, adapter, quantized or dataset.
        parents: concrete parent refs (``name@vN``) or external sources (hub ids): the lineage.
        config: the config that produced the artifact (JSON-safe).
        metrics: numbers measured when it was produced (loss, perplexity, size...).
        data_fingerprint: sha256 over the training/calibration data, when there was any.
        files: relative path -> ``{"sha256": hex, "size": bytes}`` for every stored file.
        created_at: ISO-8601 UTC time of registration.
        library_versions: python, torch, transformers, ... at registration time.
        extra: free-form metadata from the producing stage.
        upload_id: where the files live in the store (``<name>/objects/<upload_id>/``).
    """

    ref: ArtifactRef
    kind: str
    parents: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    data_fingerprint: str | None = None
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    created_at: str = ""
    library_versions: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    upload_id: str = ""

    @property
    def total_size(self) -> int:
        """Bytes over all files."""
        return sum(int(info["size"]) for info in self.files.values())

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (the stored form)."""
        return {"format": MANIFEST_FORMAT, "name": self.ref.name, "version": self.ref.version,
                "ref": str(self.ref), "kind": self.kind, "parents": list(self.parents),
                "config": self.config, "metrics": self.metrics, "data_fingerprint": self.data_fingerprint,
                "files": self.files, "created_at": self.created_at,
                "library_versions": self.library_versions, "extra": self.extra, "upload_id": self.upload_id}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Any, *, where: str = "manifest") -> Manifest:
        """Parse a stored manifest, rejecting anything incomplete or unsafe (IntegrityError)."""
        if not isinstance(data, dict):
            raise IntegrityError(f"{where}: not a JSON object")
        missing = [k for k in ("name", "version", "kind", "files", "upload_id") if k not in data]
        if missing:
            raise IntegrityError(f"{where}: incomplete manifest, missing {', '.join(missing)}")
        try:
            ref = ArtifactRef(data["name"], data["version"])
        except RegistryError as exc:
            raise IntegrityError(f"{where}: {exc}") from None
        files = data["files"]
        if not isinstance(files, dict):
            raise IntegrityError(f"{where}: 'files' is not a mapping")
        for rel, info in files.items():
            check_relpath(rel, where=where)
            if (not isinstance(info, dict) or not _SHA256_RE.fullmatch(str(info.get("sha256", "")))
                    or not isinstance(info.get("size"), int)):
                raise IntegrityError(f"{where}: bad entry for file {rel!r}")
        upload_id = data["upload_id"]
        if not isinstance(upload_id, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", upload_id):
            raise IntegrityError(f"{where}: bad upload id {upload_id!r}")
        return cls(ref=ref, kind=str(data["kind"]), parents=list(data.get("parents") or []),
                   config=dict(data.get("config") or {}), metrics=dict(data.get("metrics") or {}),
                   data_fingerprint=data.get("data_fingerprint"), files=dict(files),
                   created_at=str(data.get("created_at", "")),
                   library_versions=dict(data.get("library_versions") or {}),
                   extra=dict(data.get("extra") or {}), upload_id=upload_id)


def check_relpath(rel: str, *, where: str = "manifest") -> str:
    """A file path inside a version must stay inside it: relative, posix, no ``..``."""
    parts = PurePosixPath(rel).parts if isinstance(rel, str) else ()
    if (not parts or rel.startswith("/") or "\\" in rel or any(p in ("..", ".", "") for p in parts)
            or "\x00" in rel):
        raise IntegrityError(f"{where}: unsafe file path {rel!r}")
    return rel


def to_jsonable(value: Any) -> Any:
    """Convert configs and metrics to plain JSON types (dataclasses, paths, numpy/torch scalars)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(to_jsonable(v) for v in value)
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)  # keep files strict JSON
    if value is None or isinstance(value, (str, int, bool)):
        return value
    if isinstance(value, (Path, PurePosixPath, ArtifactRef)):
        return str(value)
    if hasattr(value, "to_dict"):
        return to_jsonable(value.to_dict())
    if hasattr(value, "item") and callable(value.item):
        try:
            return to_jsonable(value.item())
        except (TypeError, ValueError, RuntimeError):
            pass
    return str(value)


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape an artifact, read from package metadata (no imports)."""
    import platform
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for dist in ("llmstack", "torch", "transformers", "tokenizers", "peft", "safetensors", "ray",
                 "bitsandbytes", "accelerate"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return versions
