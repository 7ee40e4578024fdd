"""Load the two sides of a comparison: full models, adapters on their base, quantized models."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llmstack.errors import ArtifactNotFoundError, ModelLoadError

if TYPE_CHECKING:
    from llmstack.registry import ArtifactRef, Manifest, Registry

#: What ``validate`` accepts for each side: a registry reference, a local directory, or a loaded pair.
ModelSpec = Any  # str | ArtifactRef | tuple[model, tokenizer]


@dataclass
class LoadedModel:
    """A model ready for scoring, with where it came from."""

    model: Any
    tokenizer: Any
    label: str  # "name@vN", a directory, or "<candidate in memory>"
    ref: ArtifactRef | None = None
    manifest: Manifest | None = None


def load_side(spec: ModelSpec, *, registry: Registry | None, role: str) -> LoadedModel:
    """Load ``spec`` for validation (``role`` is "candidate" or "baseline", for messages)."""
    from llmstack.registry import ArtifactRef, Registry

    if isinstance(spec, tuple):
        if len(spec) != 2:
            raise ModelLoadError(f"{role}: expected (model, tokenizer), got a tuple of {len(spec)}")
        model, tokenizer = spec
        model.eval()
        return LoadedModel(model, tokenizer, label=f"<{role} in memory>")
    if isinstance(spec, ArtifactRef) or (isinstance(spec, str) and ArtifactRef.looks_like(spec)):
        registry = registry or Registry()
        try:
            ref = registry.resolve(spec)
        except ArtifactNotFoundError:
            if isinstance(spec, ArtifactRef) or "@" in spec:
                raise
        else:
            manifest = registry.manifest(ref)
            model, tokenizer = _load_registered(registry, manifest, role=role)
            model.eval()
            return LoadedModel(model, tokenizer, label=str(ref), ref=ref, manifest=manifest)
    if not isinstance(spec, str):
        raise ModelLoadError(f"{role}: expected a registry reference, a directory or (model, tokenizer); "
                             f"got {type(spec).__name__}")
    try:  # a directory or hub id: quantized directories are rebuilt from their recipe
        from llmstack.quantize import load_any  # type: ignore[attr-defined]
    except ImportError:
        from llmstack.models import load_model as load_any
    model, tokenizer = load_any(spec, registry=registry)
    model.eval()
    return LoadedModel(model, tokenizer, label=spec)


def _load_registered(registry: Registry, manifest: Manifest, *, role: str) -> tuple[Any, Any]:
    kind, ref = manifest.kind, manifest.ref
    if kind == "model":
        from llmstack.models import load_model

        return load_model(str(ref), registry=registry)
    if kind == "quantized":
        try:
            from llmstack.quantize import load_quantized  # type: ignore[attr-defined]
        except ImportError as exc:
            raise ModelLoadError(f"{role} {ref} is a quantized model but llmstack.quantize cannot load it "
                                 f"({exc}); install the quantization extras or validate the float model") from None
        return load_quantized(registry, ref)
    if kind == "adapter":
        return _load_adapter(registry, manifest, role=role)
    raise ModelLoadError(f"{role} {ref} is a {kind}, not a model; validate compares models, adapters and "
                         "quantized models")


def _load_adapter(registry: Registry, manifest: Manifest, *, role: str) -> tuple[Any, Any]:
    """Load the base named in the adapter's lineage, then apply the adapter with peft."""
    from llmstack.registry import ArtifactRef

    base_manifest = None
    for parent in manifest.parents:
        if not ArtifactRef.looks_like(parent):
            continue
        try:
            candidate = registry.manifest(parent)
        except ArtifactNotFoundError:
            continue
        if candidate.kind in ("model", "quantized"):
            base_manifest = candidate
            break
    if base_manifest is None:
        raise ModelLoadError(f"{role} {manifest.ref} is an adapter but none of its parents "
                             f"({', '.join(manifest.parents) or 'none'}) is a registered base model")
    base, tokenizer = _load_registered(registry, base_manifest, role=role)
    directory = registry.fetch(manifest.ref)
    try:
        from peft import PeftModel

        model = PeftModel.from_pretrained(base, str(directory), is_trainable=False)
    except Exception as exc:
        raise ModelLoadError(f"cannot apply adapter {manifest.ref} to {base_manifest.ref}: {exc}") from None
    if (directory / "tokenizer.json").is_file() or (directory / "tokenizer_config.json").is_file():
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(directory))
        except Exception:
            pass  # fall back to the base's tokenizer
    return model, tokenizer
