"""Load the two sides of a comparison: full models, adapters on their base, quantized models.

Everything but an in-memory pair goes through :func:`llmstack.models.load_artifact`, the loader every
stage shares: a BitFit or QLoRA adapter validates on the base it was trained on, as it was trained.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llmstack.errors import ModelLoadError

if TYPE_CHECKING:
    from llmstack.models import Artifact
    from llmstack.registry import ArtifactRef, Manifest, Registry

#: What ``validate`` accepts for each side: a registry reference, a local directory, or a loaded pair.
ModelSpec = Any  # str | ArtifactRef | Artifact | tuple[model, tokenizer]


@dataclass
class ComparedModel:
    """One side of a comparison, ready for scoring: :func:`llmstack.models.load_artifact`'s result, or a model
    given in memory (``artifact`` None)."""

    model: Any
    tokenizer: Any
    label: str  # "name@vN", a directory, or "<candidate in memory>"
    ref: ArtifactRef | None = None
    manifest: Manifest | None = None
    artifact: Artifact | None = None


def load_side(spec: ModelSpec, *, registry: Registry | None, role: str) -> ComparedModel:
    """Load ``spec`` for validation (``role`` is "candidate" or "baseline", for messages)."""
    from llmstack.models import Artifact, load_artifact
    from llmstack.registry import ArtifactRef, Registry

    if isinstance(spec, tuple):
        if len(spec) != 2:
            raise ModelLoadError(f"{role}: expected (model, tokenizer), got a tuple of {len(spec)}")
        model, tokenizer = spec
        model.eval()
        return ComparedModel(model, tokenizer, label=f"<{role} in memory>")
    if not isinstance(spec, (str, ArtifactRef, Artifact)):
        raise ModelLoadError(f"{role}: expected a registry reference, a directory or (model, tokenizer); "
                             f"got {type(spec).__name__}")
    if not isinstance(spec, Artifact) and ArtifactRef.looks_like(spec):
        registry = registry or Registry()
    try:
        loaded = load_artifact(spec, registry=registry)
    except ModelLoadError as exc:
        raise ModelLoadError(f"{role}: {exc}") from None
    artifact = loaded.artifact
    manifest = registry.manifest(artifact.ref) if artifact.ref is not None and registry is not None else None
    return ComparedModel(loaded.model, loaded.tokenizer, label=artifact.label, ref=artifact.ref, manifest=manifest,
                       artifact=artifact)
