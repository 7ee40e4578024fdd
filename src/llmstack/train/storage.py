"""Checkpoint storage on fsspec: a local path or an object-store URL, as Ray Train needs it.

Ray Train takes a ``storage_path`` plus an optional ``pyarrow.fs`` filesystem. For ``s3://`` we
build ``pyarrow.fs.S3FileSystem`` ourselves (so custom endpoints such as MinIO or a loopback test
server work through ``endpoint_override``); other fsspec protocols go through
``pyarrow.fs.PyFileSystem(FSSpecHandler(...))``. The same settings give an fsspec filesystem that
the driver uses for its own files (probe, model signature, metrics, plot).
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from llmstack.errors import ConfigError

# Bounded retries so an unreachable endpoint fails in seconds, not minutes.
_S3_CONFIG = {"connect_timeout": 5, "read_timeout": 30, "retries": {"max_attempts": 2}}


@dataclass
class Storage:
    """A resolved storage location."""

    url: str  # normalised: absolute local path or protocol://bucket/prefix
    protocol: str  # "file", "s3", ...
    path: str  # filesystem-native path (no protocol)
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def is_local(self) -> bool:
        return self.protocol == "file"

    def fs(self) -> Any:
        """The fsspec filesystem (bounded retries for S3)."""
        import fsspec

        if self.is_local:
            return fsspec.filesystem("file")
        options = dict(self.options)
        if self.protocol == "s3":
            config = dict(_S3_CONFIG)
            config.update(options.pop("config_kwargs", {}) or {})
            options["config_kwargs"] = config
        return fsspec.filesystem(self.protocol, **options)

    def join(self, *parts: str) -> str:
        return "/".join([self.path.rstrip("/"), *[p.strip("/") for p in parts]])

    def url_of(self, fs_path: str) -> str:
        return fs_path if self.is_local else f"{self.protocol}://{fs_path}"

    def for_ray(self) -> tuple[str, Any]:
        """``(storage_path, storage_filesystem)`` for ``ray.train.RunConfig``."""
        if self.is_local:
            return self.path, None
        if self.protocol == "s3":
            return self.path, _arrow_s3(self.options)
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        return self.path, PyFileSystem(FSSpecHandler(self.fs()))


def resolve_storage(url: str, storage_options: dict[str, Any] | None = None) -> Storage:
    """Parse ``url`` (local path, ``file://``, ``s3://``, other fsspec URLs) into a :class:`Storage`."""
    parsed = urlparse(str(url))
    if parsed.scheme in ("", "file") or (len(parsed.scheme) == 1 and os.name == "nt"):
        local = Path(parsed.path if parsed.scheme == "file" else str(url)).expanduser().resolve()
        return Storage(url=str(local), protocol="file", path=str(local))
    protocol = "s3" if parsed.scheme in ("s3", "s3a") else parsed.scheme
    path = (parsed.netloc + parsed.path).rstrip("/")
    if not parsed.netloc:
        raise ConfigError(f"storage_path: {url!r} has no bucket/host; expected e.g. s3://bucket/runs")
    options = dict(storage_options or {})
    if protocol == "s3":
        options = _s3_options(options)
    return Storage(url=f"{protocol}://{path}", protocol=protocol, path=path, options=options)


def probe(storage: Storage, run_name: str) -> Any:
    """Create the run directory and write + delete a probe file; return the fsspec filesystem.

    Raises:
        ConfigError: the location cannot be written (message names the URL and the cause).
    """
    target = storage.join(run_name)
    try:
        fs = storage.fs()
        fs.makedirs(target, exist_ok=True)
        probe_path = f"{target}/.llmstack-probe-{uuid.uuid4().hex[:8]}"
        fs.pipe(probe_path, b"ok")
        fs.rm(probe_path)
    except Exception as exc:  # any failure here means workers would fail later
        cause = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:300]
        hint = ("check the bucket, credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or storage_options) "
                "and endpoint (storage_options.endpoint_url or AWS_ENDPOINT_URL)" if not storage.is_local
                else "pick a directory you can write to")
        raise ConfigError(f"storage_path: cannot write checkpoints to {storage.url} ({cause}); "
                          f"set storage_path to a writable location or {hint}") from None
    return fs


def _s3_options(options: dict[str, Any]) -> dict[str, Any]:
    """s3fs options, filled from the standard AWS environment variables when not given."""
    options = dict(options)
    client_kwargs = dict(options.get("client_kwargs") or {})
    endpoint = options.pop("endpoint_url", None) or client_kwargs.get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        client_kwargs["endpoint_url"] = endpoint
    region = client_kwargs.get("region_name") or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    if region:
        client_kwargs["region_name"] = region
    if client_kwargs:
        options["client_kwargs"] = client_kwargs
    if "key" not in options and os.environ.get("AWS_ACCESS_KEY_ID"):
        options["key"] = os.environ["AWS_ACCESS_KEY_ID"]
    if "secret" not in options and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        options["secret"] = os.environ["AWS_SECRET_ACCESS_KEY"]
    return options


def _arrow_s3(options: dict[str, Any]) -> Any:
    """``pyarrow.fs.S3FileSystem`` with the same endpoint and credentials as the s3fs options."""
    from pyarrow.fs import S3FileSystem

    client_kwargs = options.get("client_kwargs") or {}
    kwargs: dict[str, Any] = {"region": client_kwargs.get("region_name") or "us-east-1",
                              "connect_timeout": 5, "request_timeout": 60}
    endpoint = client_kwargs.get("endpoint_url")
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    if options.get("key"):
        kwargs["access_key"] = options["key"]
        kwargs["secret_key"] = options.get("secret")
    if options.get("anon"):
        kwargs["anonymous"] = True
    return S3FileSystem(**kwargs)
