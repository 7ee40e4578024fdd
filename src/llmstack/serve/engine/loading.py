"""What an engine serves: the base model (loaded by ``llmstack.models.load_artifact``, the one loader, and
wrapped by :meth:`ServedModel.of_artifact`) and the adapters it may load on it (described and base-checked
up front, their weights loaded lazily).

Every kind fine-tuning and quantization produce serves: full, merged and quantized models; LoRA, DoRA,
BitFit and QLoRA adapters (an adapter named as the model loads on the base it was trained on, a QLoRA
one on its NF4 base). An adapter served beside a model must have been trained on that model: anything
else is refused at load time, naming both.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmstack.errors import ModelLoadError

if TYPE_CHECKING:
    from llmstack.models import Artifact, LoadedArtifact
    from llmstack.registry import Registry


@dataclass
class AdapterSpec:
    """An adapter served on the engine's base model under ``id``."""

    id: str  # served model id (the registry name, or the directory name)
    source: str  # registry ref (pinned to name@vN), local directory or fsspec URL
    identity: str  # cache key part: never shared by two different adapters
    registry: Any = None
    storage_options: dict[str, Any] = field(default_factory=dict)
    artifact: Artifact | None = None  # described once (resolve_adapters); else described on first load

    def describe(self) -> Artifact:
        from llmstack.models import describe_artifact

        if self.artifact is None:
            self.artifact = describe_artifact(self.source, registry=self.registry,
                                              storage_options=self.storage_options)
        return self.artifact


def dir_identity(path: Path) -> str:
    """Content identity of a local directory (names, sizes, mtimes): changes when its files change."""
    from llmstack.models.artifact import directory_identity

    return directory_identity(Path(path))


@dataclass
class ServedModel:
    """What an engine serves: a model and tokenizer with the ids and cache identity it serves them under.

    Built from :func:`llmstack.models.load_artifact`'s result by :meth:`of_artifact`, or in memory (tests,
    benchmarks) with ``artifact`` None.
    """

    model: Any
    tokenizer: Any
    model_id: str  # served id
    root: str  # name@vN or the directory
    identity: str  # model-version part of cache keys
    adapter_dir: Path | None = None  # an adapter to attach as the served model (tests; load_artifact attaches its own)
    source: str | None = None  # what the config named (e.g. name@production), accepted as a model id
    artifact: Artifact | None = None  # what was loaded (None: built in memory)

    @classmethod
    def of_artifact(cls, loaded: LoadedArtifact, *, source: str | None = None) -> ServedModel:
        """Serve ``loaded`` (from :func:`llmstack.models.load_artifact`) under its artifact's name.

        Raises:
            ModelLoadError: the artifact is a tokenizer alone (serve a model, adapter or quantized version).
        """
        artifact = loaded.artifact
        if artifact.kind not in ("model", "quantized", "adapter"):
            raise ModelLoadError(f"{artifact.label} is a {artifact.kind!r} artifact; serve a model, adapter or "
                                 "quantized artifact")
        root = str(artifact.ref) if artifact.ref is not None else str(artifact.directory)
        return cls(loaded.model, loaded.tokenizer, artifact.name, root, artifact.identity, source=source,
                   artifact=artifact)


def resolve_adapters(entries: Iterable[str], *, registry: Registry | None, base: Artifact | None = None,
                     storage_options: dict[str, Any] | None = None) -> list[AdapterSpec]:
    """Turn config entries (``ref``, ``path``, ``url`` or ``id=any of those``) into pinned, base-checked specs.

    Raises:
        ModelLoadError: an entry is not an adapter, was trained on another base than ``base``, or two share an id.
    """
    from llmstack.models import check_adapter_base, describe_artifact

    specs: list[AdapterSpec] = []
    for entry in entries:
        served_id, sep, source = entry.partition("=")
        if not sep:
            served_id, source = "", entry
        artifact = describe_artifact(source, registry=registry, storage_options=storage_options)
        if artifact.kind != "adapter":
            raise ModelLoadError(f"{artifact.label} is a {artifact.kind!r} artifact, not an adapter")
        if base is not None:
            check_adapter_base(artifact, base)
        spec = AdapterSpec(served_id or artifact.name, str(artifact.ref or source), artifact.identity,
                           registry=registry, storage_options=dict(storage_options or {}), artifact=artifact)
        if any(s.id == spec.id for s in specs):
            raise ModelLoadError(f"two adapters are served as {spec.id!r}; give one another id with id=source")
        specs.append(spec)
    return specs
