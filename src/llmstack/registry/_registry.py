"""The artifact registry: immutable versions, manifests written last, atomic aliases, promotion history.

One module on purpose (~700 lines): every public method of :class:`Registry` relies on the same
storage invariants (upload ids, exclusive manifest creation, compare-and-swap aliases), which read
best next to each other; refs, manifests, formatting and the store live in their own modules.

Storage layout below the registry root (a local directory, ``memory://...`` or ``s3://bucket/prefix``)::

    <name>/objects/<upload_id>/<files...>   payload, written first under a fresh upload id
    <name>/versions/v000003.json            the manifest; its exclusive creation *is* version 3
    <name>/aliases/<alias>.json             {"version": N, "history": [...]}, swapped atomically
    <name>/annotations/v000003/<key>.json   data attached later (e.g. validation reports)

A writer uploads every file under its own upload id, then claims the next version number by
exclusively creating that number's manifest. Two writers racing on one name therefore never share a
version: the loser's create fails and it takes the next number, its files untouched. A crash before
the manifest leaves only an unreferenced upload directory, which no reader ever sees (``gc()`` removes
it). Each alias file carries its own history, so moving an alias and recording why are one atomic write.
"""

from __future__ import annotations

import functools
import inspect
import getpass
import hashlib
import json
import os
import re
import shutil
import threading
import uuid
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from llmstack.errors import (AliasConflictError, ArtifactNotFoundError, IntegrityError, LLMStackError, RegistryError,
                             ValidationFailedError)
from llmstack.registry._manifest import KINDS, Manifest, check_relpath, library_versions, to_jsonable
from llmstack.registry._refs import ArtifactRef, parse_version, validate_alias, validate_name
from llmstack.registry._store import CHUNK, PreconditionFailed, Store, open_store

#: File types that may hold pickled Python objects; the registry refuses them (safetensors only).
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npz"})
_UNSET: Any = object()
_VERSION_FILE_RE = re.compile(r"v([0-9]+)\.json")
_PROGRESS_MIN_BYTES = 64 * 1024 * 1024

# (path, size, mtime_ns) -> sha256, so repeated fetches of an unchanged local file hash it once.
_HASH_MEMO: dict[tuple[str, int, int], str] = {}
_HASH_MEMO_LOCK = threading.Lock()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _dumps(data: Any) -> bytes:
    return json.dumps(data, indent=2, sort_keys=True).encode()


def validation_key(baseline: ArtifactRef | str) -> str:
    """Annotation key under which a validation report against ``baseline`` is stored."""
    ref = baseline if isinstance(baseline, ArtifactRef) else _concrete(str(baseline))
    return f"validation.{ref.name}.v{ref.version}"


def _concrete(text: str) -> ArtifactRef:
    return ArtifactRef.concrete(text)


def hash_file(path: Path, *, memo: bool = False) -> str:
    """sha256 of a local file (memoised on path, inode, size, mtime and ctime when ``memo``).

    ctime is in the key because a writer can restore size and mtime (``os.utime``) but not ctime."""
    stat = path.stat()
    key = (str(path), stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    if memo:
        with _HASH_MEMO_LOCK:
            if key in _HASH_MEMO:
                return _HASH_MEMO[key]
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    value = digest.hexdigest()
    with _HASH_MEMO_LOCK:
        _HASH_MEMO[key] = value
    return value


def _rebuild(url: str, storage_options: dict[str, Any] | None) -> Registry:
    return Registry(url, storage_options=storage_options)


class Registry:
    """Versioned artifact store over fsspec: a local directory, ``memory://`` or ``s3://``.

    Args:
        url: registry root. ``None`` uses ``$LLMSTACK_REGISTRY`` or ``~/.llmstack/registry``.
        storage_options: passed to fsspec (e.g. ``{"endpoint_url": ..., "key": ..., "secret": ...}``).

    Example:
        >>> reg = Registry("memory://doc-registry")
        >>> import tempfile, pathlib
        >>> src = pathlib.Path(tempfile.mkdtemp()); _ = (src / "config.json").write_text("{}")
        >>> ref = reg.register("demo", src, kind="model")
        >>> str(ref), str(reg.resolve("demo"))
        ('demo@v1', 'demo@v1')
    """

    def __init__(self, url: str | os.PathLike[str] | None = None, *,
                 storage_options: dict[str, Any] | None = None) -> None:
        if url is None:
            url = os.environ.get("LLMSTACK_REGISTRY") or str(Path("~/.llmstack/registry").expanduser())
        url = os.fspath(url)
        if not url:
            raise RegistryError("registry url is empty; pass a directory, memory://... or s3://bucket/prefix")
        self.storage_options = dict(storage_options or {})
        try:
            self._store: Store = open_store(url, storage_options=self.storage_options)
        except (ImportError, ValueError) as exc:
            raise RegistryError(f"cannot open registry {url!r}: {exc}") from None
        self.url: str = self._store.url
        self._manifests: dict[tuple[str, int], Manifest] = {}  # manifests are immutable: cache them

    def __repr__(self) -> str:
        return f"Registry({self.url!r})"

    def __reduce__(self) -> tuple[Any, ...]:  # picklable for Ray tasks
        return _rebuild, (self.url, self.storage_options)

    # ------------------------------------------------------------------ writing versions
    def register(self, name: str, source_dir: str | os.PathLike[str], *, kind: str,
                 parents: Iterable[str | ArtifactRef] = (), config: Any = None,
                 metrics: dict[str, Any] | None = None, data_fingerprint: str | None = None,
                 extra: dict[str, Any] | None = None) -> ArtifactRef:
        """Upload every file of ``source_dir`` as the next version of ``name``; the manifest goes last.

        Args:
            name: artifact name (letters, digits, ``.``, ``_``, ``-``).
            source_dir: local directory with the files (weights as ``.safetensors`` only).
            kind: one of tokenizer, model, adapter, quantized, dataset.
            parents: lineage; registry refs are resolved to concrete ``name@vN``.
            config, metrics, data_fingerprint, extra: recorded in the manifest.

        Returns:
            The new immutable reference, e.g. ``ArtifactRef("tiny-lm", 4)``.

        Raises:
            RegistryError: bad name or kind, missing/empty directory, pickle-format files.
        """
        validate_name(name)
        if kind not in KINDS:
            raise RegistryError(f"unknown artifact kind {kind!r}; allowed: {', '.join(KINDS)}")
        source = Path(source_dir).expanduser()
        if not source.is_dir():
            raise RegistryError(f"cannot register {name}: {source} is not a directory")
        files = sorted(p for p in source.rglob("*") if p.is_file())
        if not files:
            raise RegistryError(f"cannot register {name}: {source} holds no files")
        unsafe = [p.relative_to(source).as_posix() for p in files if p.suffix.lower() in PICKLE_SUFFIXES]
        if unsafe:
            raise RegistryError(
                f"cannot register {name}: {', '.join(unsafe)} may hold pickled objects; llmstack stores "
                "weights as .safetensors only (save with save_pretrained(..., safe_serialization=True))")
        parent_refs = [self._lineage(p) for p in parents]
        upload_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:16]
        prefix = f"{name}/objects/{upload_id}"
        try:
            entries = self._upload(source, files, prefix)
        except BaseException as exc:
            try:  # leave nothing behind; even if this fails, the files are invisible without a manifest
                self._store.delete_tree(prefix)
            except Exception:
                pass
            if isinstance(exc, OSError):
                raise RegistryError(f"cannot write {name} to {self.url}: {exc}") from exc
            raise
        body = {"kind": kind, "parents": parent_refs, "config": to_jsonable(config or {}),
                "metrics": to_jsonable(metrics or {}), "data_fingerprint": data_fingerprint,
                "files": entries, "library_versions": library_versions(),
                "extra": to_jsonable(extra or {}), "upload_id": upload_id}
        try:  # a failure here may still have created the manifest, so the files stay (gc() reclaims)
            return self._claim_version(name, body)
        except OSError as exc:
            raise RegistryError(f"cannot write the manifest of {name} to {self.url}: {exc}") from exc

    def _lineage(self, parent: str | ArtifactRef) -> str:
        if isinstance(parent, ArtifactRef):
            return str(self.resolve(parent))
        text = str(parent)
        if ArtifactRef.looks_like(text):
            return str(self.resolve(text))
        return text  # an external source such as a hub id: recorded verbatim

    def _upload(self, source: Path, files: list[Path], prefix: str) -> dict[str, dict[str, Any]]:
        from tqdm.auto import tqdm

        total = sum(p.stat().st_size for p in files)
        entries: dict[str, dict[str, Any]] = {}
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"upload {prefix.split('/')[0]}",
                  disable=total < _PROGRESS_MIN_BYTES) as bar:
            for path in files:
                rel = check_relpath(path.relative_to(source).as_posix(), where=str(source))
                entries[rel] = self._upload_file(path, f"{prefix}/{rel}", bar)
        return entries

    def _upload_file(self, path: Path, key: str, bar: Any = None) -> dict[str, Any]:
        """Stream one file into the store, hashing exactly the bytes written."""
        digest, size = hashlib.sha256(), 0
        with open(path, "rb") as src, self._store.open_write(key) as dst:
            while chunk := src.read(CHUNK):
                digest.update(chunk)
                dst.write(chunk)
                size += len(chunk)
                if bar is not None:
                    bar.update(len(chunk))
        return {"sha256": digest.hexdigest(), "size": size}

    def _claim_version(self, name: str, body: dict[str, Any]) -> ArtifactRef:
        """Exclusively create the next version's manifest; on a lost race take the next number."""
        for _ in range(1000):
            version = max(self._version_numbers(name), default=0) + 1
            manifest = Manifest(ref=ArtifactRef(name, version), created_at=_now(), **body)
            try:
                self._store.create(self._manifest_key(name, version), _dumps(manifest.to_dict()))
            except FileExistsError:
                continue
            self._manifests[(name, version)] = manifest
            return manifest.ref
        raise RegistryError(f"cannot allocate a version of {name}: too many concurrent writers")

    # ------------------------------------------------------------------ reading versions
    @staticmethod
    def _manifest_key(name: str, version: int) -> str:
        return f"{name}/versions/v{version:06d}.json"

    def _version_numbers(self, name: str) -> list[int]:
        """Every claimed version number (complete or not) of ``name``."""
        numbers = []
        for entry in self._store.list(f"{name}/versions"):
            match = _VERSION_FILE_RE.fullmatch(entry)
            if match:
                numbers.append(int(match.group(1)))
        return sorted(numbers)

    def _load_manifest(self, name: str, version: int) -> Manifest:
        """The manifest of ``name@v{version}``; ArtifactNotFoundError if absent, IntegrityError if broken."""
        cached = self._manifests.get((name, version))
        if cached is not None:
            return cached
        key = self._manifest_key(name, version)
        try:
            raw = self._store.read(key)
        except FileNotFoundError:
            raise ArtifactNotFoundError(self._not_found(f"{name}@v{version}", name)) from None
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise IntegrityError(f"{name}@v{version}: manifest is not valid JSON (partial write?)") from None
        manifest = Manifest.from_dict(data, where=f"{name}@v{version}")
        if manifest.ref != ArtifactRef(name, version):
            raise IntegrityError(f"{name}@v{version}: manifest describes {manifest.ref}")
        self._manifests[(name, version)] = manifest
        return manifest

    def _complete_versions(self, name: str) -> list[int]:
        complete = []
        for version in self._version_numbers(name):
            try:
                self._load_manifest(name, version)
            except (IntegrityError, ArtifactNotFoundError):
                continue  # not a version: never listed, resolved or loaded
            complete.append(version)
        return complete

    def _not_found(self, what: str, name: str) -> str:
        versions = self._complete_versions(name) if name else []
        if versions:
            known = ", ".join(f"v{v}" for v in versions[-10:])
            aliases = ", ".join(sorted(self.aliases(name))) or "none"
            return f"{what} not found in {self.url}; {name} has versions {known} and aliases: {aliases}"
        names = ", ".join(self.names()[:20]) or "none"
        return f"{what} not found in {self.url}; registered names: {names}"

    def resolve(self, ref: str | ArtifactRef) -> ArtifactRef:
        """Turn ``name``, ``name@latest``, ``name@vN`` or ``name@alias`` into a concrete ref.

        Raises:
            ArtifactNotFoundError: no such name, version or alias (the message lists what exists).
            RegistryError: ``ref`` is not a syntactically valid reference.
        """
        if isinstance(ref, ArtifactRef):
            return self._load_manifest(ref.name, ref.version).ref
        name, selector = ArtifactRef.parse(ref)
        if selector is None or selector == "latest":
            versions = self._version_numbers(name)
            for version in reversed(versions):
                try:
                    return self._load_manifest(name, version).ref
                except (IntegrityError, ArtifactNotFoundError):
                    continue
            raise ArtifactNotFoundError(self._not_found(f"{name} (no complete version)", ""))
        version = parse_version(selector)
        if version is not None:
            return self._load_manifest(name, version).ref
        state = self._alias_state(name, selector)
        if state.get("version") is None:
            raise ArtifactNotFoundError(self._not_found(f"alias {name}@{selector}", name))
        return self._load_manifest(name, int(state["version"])).ref

    def manifest(self, ref: str | ArtifactRef) -> Manifest:
        """The manifest of ``ref`` (resolved first)."""
        resolved = self.resolve(ref)
        return self._load_manifest(resolved.name, resolved.version)

    def exists(self, ref: str | ArtifactRef) -> bool:
        """Whether ``ref`` resolves to a complete version."""
        try:
            self.resolve(ref)
        except (ArtifactNotFoundError, IntegrityError):
            return False
        return True

    def names(self) -> list[str]:
        """Names with at least one complete version."""
        names = []
        for entry in self._store.list(""):
            if ArtifactRef.looks_like(entry) and "@" not in entry and self._complete_versions(entry):
                names.append(entry)
        return names

    def list(self, name: str | None = None) -> list[Manifest]:
        """Manifests of complete versions (of ``name``, or of every name), oldest first."""
        names = [validate_name(name)] if name is not None else self.names()
        return [self._load_manifest(n, v) for n in names for v in self._complete_versions(n)]

    def show(self, ref: str | ArtifactRef) -> dict[str, Any]:
        """Manifest plus the aliases pointing at it and its annotations, as one JSON-safe dict."""
        manifest = self.manifest(ref)
        aliases = sorted(a for a, v in self.aliases(manifest.ref.name).items() if v == manifest.ref.version)
        return {**manifest.to_dict(), "aliases": aliases, "annotations": self.annotations(manifest.ref)}

    # ------------------------------------------------------------------ integrity and fetching
    def verify(self, ref: str | ArtifactRef) -> None:
        """Re-hash every stored file of ``ref`` against its manifest.

        Raises:
            IntegrityError: names every missing, modified or unexpected file (``exc.files`` maps
                path -> problem).
        """
        manifest = self.manifest(ref)
        prefix = f"{manifest.ref.name}/objects/{manifest.upload_id}"
        problems: dict[str, str] = {}
        for rel, info in sorted(manifest.files.items()):
            key = f"{prefix}/{rel}"
            try:
                digest, size = hashlib.sha256(), 0
                with self._store.open_read(key) as fh:
                    while chunk := fh.read(CHUNK):
                        digest.update(chunk)
                        size += len(chunk)
            except FileNotFoundError:
                problems[rel] = "missing"
                continue
            if size != info["size"]:
                problems[rel] = f"size {size} != {info['size']}"
            elif digest.hexdigest() != info["sha256"]:
                problems[rel] = "sha256 mismatch (modified)"
        for rel in self._store.find(prefix):
            if rel not in manifest.files:
                problems[rel] = "unexpected file (not in manifest)"
        if problems:
            listing = "; ".join(f"{rel}: {why}" for rel, why in problems.items())
            error = IntegrityError(f"{manifest.ref} failed verification ({len(problems)} file"
                                   f"{'s' if len(problems) != 1 else ''}): {listing}")
            error.files = problems  # type: ignore[attr-defined]
            raise error

    def fetch(self, ref: str | ArtifactRef) -> Path:
        """A local directory holding the version's files, hash-checked against the manifest.

        Local registries return the stored directory itself (treat it as read-only); remote ones
        download into ``$LLMSTACK_CACHE`` (default ``~/.cache/llmstack``) once and reuse it.

        Raises:
            IntegrityError: a file is missing or does not match its sha256, or the version holds a file
                its manifest does not list.
        """
        manifest = self.manifest(ref)
        prefix = f"{manifest.ref.name}/objects/{manifest.upload_id}"
        local = self._store.local_path(prefix)
        if local is not None:
            self._check_local(local, manifest)
            return local
        cache_root = Path(os.environ.get("LLMSTACK_CACHE") or Path("~/.cache/llmstack").expanduser())
        url_id = hashlib.sha256(self.url.encode()).hexdigest()[:16]
        target = cache_root / "registry" / url_id / manifest.ref.name / f"v{manifest.ref.version}-{manifest.upload_id}"
        if target.is_dir():
            try:
                self._check_local(target, manifest)
                return target
            except IntegrityError:
                shutil.rmtree(target, ignore_errors=True)  # damaged cache: download again
        staging = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex}")
        try:
            for rel in manifest.files:
                dest = staging.joinpath(*rel.split("/"))
                dest.parent.mkdir(parents=True, exist_ok=True)
                try:
                    with self._store.open_read(f"{prefix}/{rel}") as src, open(dest, "wb") as out:
                        shutil.copyfileobj(src, out, CHUNK)
                except FileNotFoundError:
                    dest.unlink(missing_ok=True)  # reported with the other problems just below
            self._check_local(staging, manifest)
            try:
                os.rename(staging, target)
            except OSError:  # another process finished first; use its copy
                if not target.is_dir():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self._check_local(target, manifest)
        return target

    @staticmethod
    def _check_local(directory: Path, manifest: Manifest) -> None:
        """Every listed file present and unmodified, and nothing else: loaders read whole directories
        (a stray ``tokenizer.json`` would be picked up), so a version must hold exactly its manifest."""
        bad = []
        for rel, info in manifest.files.items():
            path = directory.joinpath(*rel.split("/"))
            if not path.is_file():
                bad.append(f"{rel} (missing)")
            elif path.stat().st_size != info["size"] or hash_file(path, memo=True) != info["sha256"]:
                bad.append(f"{rel} (modified)")
        for path in sorted(directory.rglob("*")):
            rel = path.relative_to(directory).as_posix()
            if (path.is_file() or path.is_symlink()) and rel not in manifest.files:
                bad.append(f"{rel} (not in the manifest)")
        if bad:
            raise IntegrityError(f"{manifest.ref} does not match its manifest: {', '.join(bad)}; "
                                 f"run `llmstack registry verify {manifest.ref}`")

    # ------------------------------------------------------------------ annotations
    def annotate(self, ref: str | ArtifactRef, key: str, data: dict[str, Any]) -> None:
        """Attach JSON ``data`` under ``key`` to an immutable version (the manifest is untouched).

        Writing the same key again replaces that annotation.
        """
        resolved = self.resolve(ref)
        validate_name(key, what="annotation key")
        if not isinstance(data, dict):
            raise RegistryError(f"annotation {key!r} must be a dict, got {type(data).__name__}")
        self._store.write(f"{resolved.name}/annotations/v{resolved.version:06d}/{key}.json",
                          _dumps(to_jsonable(data)))

    def annotations(self, ref: str | ArtifactRef) -> dict[str, dict[str, Any]]:
        """Every annotation of ``ref``, by key."""
        resolved = self.resolve(ref)
        prefix = f"{resolved.name}/annotations/v{resolved.version:06d}"
        result: dict[str, dict[str, Any]] = {}
        for entry in self._store.list(prefix):
            if not entry.endswith(".json"):
                continue
            try:
                result[entry.removesuffix(".json")] = json.loads(self._store.read(f"{prefix}/{entry}"))
            except (FileNotFoundError, json.JSONDecodeError):
                continue
        return result

    # ------------------------------------------------------------------ aliases and history
    def _alias_key(self, name: str, alias: str) -> str:
        return f"{name}/aliases/{alias}.json"

    def _alias_state(self, name: str, alias: str) -> dict[str, Any]:
        validate_name(name)
        validate_alias(alias)
        try:
            return json.loads(self._store.read(self._alias_key(name, alias)))
        except FileNotFoundError:
            return {"name": name, "alias": alias, "version": None, "history": []}

    def aliases(self, name: str) -> dict[str, int]:
        """Alias -> version for ``name`` (aliases that currently point somewhere)."""
        validate_name(name)
        result = {}
        for entry in self._store.list(f"{name}/aliases"):
            if entry.endswith(".json") and not entry.startswith("."):
                state = self._alias_state(name, entry.removesuffix(".json"))
                if state.get("version") is not None:
                    result[state["alias"]] = int(state["version"])
        return dict(sorted(result.items()))

    def set_alias(self, name: str, alias: str, version_or_ref: int | str | ArtifactRef, *,
                  expected: int | None = _UNSET, reason: str | None = None) -> None:
        """Point ``name@alias`` at a version, atomically.

        Args:
            name: artifact name.
            alias: alias to move (not ``latest`` or ``vN``).
            version_or_ref: ``3``, ``"v3"``, ``"name@v3"``, ``"name@staging"`` or an ``ArtifactRef``.
            expected: compare-and-swap: the version the alias must hold now (``None``: must be
                unset). Omit to move it unconditionally.
            reason: recorded in the alias history.

        Raises:
            AliasConflictError: the alias does not hold ``expected``.
            ArtifactNotFoundError: the target version does not exist.
        """
        target = self._target(name, version_or_ref)
        self._move_alias(name, alias, target, expected=expected, action="set", reason=reason)

    def _target(self, name: str, version_or_ref: int | str | ArtifactRef) -> ArtifactRef:
        validate_name(name)
        if isinstance(version_or_ref, bool):
            raise RegistryError(f"bad version {version_or_ref!r} for {name}")
        if isinstance(version_or_ref, int):
            return self.resolve(ArtifactRef(name, version_or_ref))
        text = str(version_or_ref)
        if not isinstance(version_or_ref, ArtifactRef) and "@" not in text:
            text = f"{name}@{text}"
        target = self.resolve(version_or_ref if isinstance(version_or_ref, ArtifactRef) else text)
        if target.name != name:
            raise RegistryError(f"an alias of {name} cannot point at {target} (another artifact)")
        return target

    def _move_alias(self, name: str, alias: str, target: ArtifactRef, *, expected: Any, action: str,
                    reason: str | None, report: dict[str, Any] | None = None,
                    forced: bool = False) -> dict[str, Any]:
        validate_alias(alias)
        event: dict[str, Any] = {}

        def swap(current: bytes | None) -> bytes:
            state = json.loads(current) if current else {"name": name, "alias": alias, "version": None,
                                                          "history": []}
            held = state.get("version")
            if expected is not _UNSET and held != expected:
                raise AliasConflictError(
                    f"{name}@{alias} moved: it holds {_v(held)}, expected {_v(expected)}; another "
                    "writer changed it first. Re-read the alias (and re-validate) and try again")
            event.clear()
            event.update({"seq": len(state["history"]) + 1, "action": action, "name": name, "alias": alias,
                          "from": held, "to": target.version, "at": _now(), "by": _user(),
                          "reason": reason, "forced": forced, "report": report})
            state.update(version=target.version, updated_at=event["at"])
            state["history"] = [*state["history"], event.copy()]
            return _dumps(state)

        try:
            self._store.update(self._alias_key(name, alias), swap)
        except PreconditionFailed as exc:
            raise AliasConflictError(f"{name}@{alias}: {exc}") from None
        return event

    def history(self, name: str, alias: str | None = None) -> list[dict[str, Any]]:
        """Every alias move of ``name`` (promotions, forced promotions, rollbacks, sets), oldest first."""
        validate_name(name)
        aliases = [alias] if alias else [e.removesuffix(".json") for e in self._store.list(f"{name}/aliases")
                                         if e.endswith(".json") and not e.startswith(".")]
        events = [e for a in aliases for e in self._alias_state(name, a).get("history", [])]
        return sorted(events, key=lambda e: (e["at"], e["alias"], e["seq"]))

    def promote(self, ref: str | ArtifactRef, alias: str = "production", *, force: bool = False,
                reason: str | None = None) -> dict[str, Any]:
        """Move ``alias`` to ``ref`` if it passed validation against the alias's current holder.

        The candidate needs a passing validation report (``llmstack.validate(..., registry=reg)``
        stores one) against the version the alias holds now; an unset alias needs none. The move is
        a compare-and-swap on that holder, so of two racing promotions one wins and the other gets
        :class:`AliasConflictError`.

        Args:
            ref: the candidate.
            alias: alias of the candidate's name to move.
            force: promote without a passing report; recorded as a ``force-promote``.
            reason: why, recorded in the history.

        Returns:
            The history event that was appended.

        Raises:
            ValidationFailedError: no passing report against the current holder (and not forced).
            IntegrityError: the candidate's stored files do not match its manifest (even if forced).
            AliasConflictError: the alias moved meanwhile.

        Aliases belong to one name, so versions that compete for ``name@production`` must be
        registered under that name (e.g. ``quantize(..., name="tiny-lm")``).
        """
        target = self.resolve(ref)
        validate_alias(alias)
        held = self.aliases(target.name).get(alias)
        if held == target.version:
            raise RegistryError(f"{target} already holds {target.name}@{alias}; nothing to promote")
        gate_ok, why, report = self._gate(target, alias, held)
        if not gate_ok and not force:
            baseline = ArtifactRef(target.name, held)  # type: ignore[arg-type]
            raise ValidationFailedError(
                f"refusing to promote {target} to {target.name}@{alias}: the alias holds {baseline} and "
                f"{why}. Run `llmstack validate {target} baseline={baseline}`, or force the promotion")
        forced = force and not gate_ok
        self.verify(target)  # never point production at files that do not match their manifest
        return self._move_alias(target.name, alias, target, expected=held,
                                action="force-promote" if forced else "promote", reason=reason,
                                report=report, forced=forced)

    def check_gate(self, ref: str | ArtifactRef, alias: str = "production") -> tuple[bool, str]:
        """Would :meth:`promote` of ``ref`` to ``alias`` pass its validation gate? ``(ok, why not)``.

        The one gate: promotion, the canary's start and its automatic promotion all ask it.
        """
        target = self.resolve(ref)
        held = self.aliases(target.name).get(alias)
        if held == target.version:
            return True, ""
        ok, why, _ = self._gate(target, alias, held)
        return ok, why

    def _gate(self, target: ArtifactRef, alias: str, held: int | None) -> tuple[bool, str, dict[str, Any] | None]:
        """``(passed, why not, the report summary)`` of ``target`` against the alias's holder ``held``."""
        if held is None:
            return True, "", None
        baseline = ArtifactRef(target.name, held)
        data = self.annotations(target).get(validation_key(baseline))
        if data is None:
            return False, f"there is no validation report against it ({baseline}, the holder of {target.name}@{alias})", None
        report = {"passed": bool(data.get("passed")), "baseline": str(baseline),
                  "summary": data.get("summary"), "failed_checks": data.get("failed_checks", [])}
        if not report["passed"]:
            return False, "its validation against it failed: " + ", ".join(report["failed_checks"] or ["?"]), report
        return True, "", report

    def rollback(self, name: str, alias: str = "production", *, reason: str | None = None) -> dict[str, Any]:
        """Point ``alias`` back at the version it held before the current one.

        Promotions and sets push onto the alias's stack of holders, rollbacks pop it, so repeated
        rollbacks walk further back.

        Returns:
            The history event that was appended.

        Raises:
            RegistryError: the alias has no earlier version to return to.
            AliasConflictError: the alias moved meanwhile.
        """
        state = self._alias_state(name, alias)
        stack: list[int] = []
        for event in state.get("history", []):
            if event["action"] == "rollback":
                if stack:
                    stack.pop()
            else:
                stack.append(int(event["to"]))
        if len(stack) < 2:
            raise RegistryError(f"{name}@{alias} has no earlier version to roll back to "
                                f"(holds {_v(state.get('version'))})")
        target = self.resolve(ArtifactRef(name, stack[-2]))
        return self._move_alias(name, alias, target, expected=state.get("version"), action="rollback",
                                reason=reason)

    # ------------------------------------------------------------------ housekeeping
    def gc(self, *, older_than_s: float = 3600.0) -> list[str]:
        """Delete upload directories that no manifest references (interrupted writes).

        Only uploads older than ``older_than_s`` are touched, so in-flight registrations survive.

        Returns:
            The removed ``name/objects/<upload_id>`` prefixes.
        """
        removed = []
        now = datetime.now(timezone.utc)
        for name in self._store.list(""):
            if not ArtifactRef.looks_like(name) or "@" in name:
                continue
            used = set()
            for version in self._version_numbers(name):
                try:
                    used.add(self._load_manifest(name, version).upload_id)
                except (IntegrityError, ArtifactNotFoundError):
                    continue
            for upload_id in self._store.list(f"{name}/objects"):
                if upload_id in used:
                    continue
                try:
                    started = datetime.strptime(upload_id.split("-")[0], "%Y%m%dT%H%M%SZ").replace(
                        tzinfo=timezone.utc)
                except ValueError:
                    continue
                if (now - started).total_seconds() >= older_than_s:
                    self._store.delete_tree(f"{name}/objects/{upload_id}")
                    removed.append(f"{name}/objects/{upload_id}")
        return removed


def _v(version: Any) -> str:
    return "nothing" if version is None else f"v{version}"


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return "unknown"


def _is_storage_error(exc: BaseException) -> bool:
    """OS-level and object-store client failures (unreachable endpoint, missing bucket, no credentials)."""
    module = type(exc).__module__ or ""
    return isinstance(exc, OSError) or module.startswith(("botocore", "aiobotocore", "s3fs", "fsspec", "aiohttp"))


def _reporting_storage_errors(method: Any) -> Any:
    @functools.wraps(method)
    def wrapper(self: Registry, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except LLMStackError:
            raise
        except Exception as exc:
            if not _is_storage_error(exc):
                raise
            detail = " ".join(str(exc).split()) or type(exc).__name__
            raise RegistryError(f"registry {self.url} could not be read or written: {detail}") from exc
    return wrapper


# Every public operation turns storage failures into one RegistryError that names the registry.
for _name, _method in list(vars(Registry).items()):
    if inspect.isfunction(_method) and not _name.startswith("_"):
        setattr(Registry, _name, _reporting_storage_errors(_method))
