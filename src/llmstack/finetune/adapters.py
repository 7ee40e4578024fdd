"""Adapter artifacts: write them from a checkpoint, describe them on their base, merge them (loading:
``llmstack.models.load_artifact(adapter_ref, base=...)``).

An adapter version in the registry is a directory::

    adapter_config.json        peft LoRA/DoRA config            (lora, qlora, dora)
    adapter_model.safetensors  peft adapter weights             (lora, qlora, dora)
    norm_scales.safetensors    the tuned biases and norm parameters (bitfit)
    llmstack_adapter.json      method, base ref, base weight hashes, base architecture

Its manifest's first parent is the base it was trained on. Loading or merging onto any other base
is refused: the base must be that registry version, or a directory whose weight files hash to it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmstack.errors import ConfigError, ModelLoadError
from llmstack.finetune.methods import METHOD_DESCRIPTIONS, PEFT_METHODS, apply_method
from llmstack.models.adapters import ADAPTER_INFO_FILE, NORM_SCALES_FILE, weight_hashes
from llmstack.models.nf4 import NF4_SETTINGS

__all__ = ["ADAPTER_INFO_FILE", "NORM_SCALES_FILE", "adapter_manifest", "base_weight_hashes", "describe_adapter",
           "merge_adapter", "merged_model", "model_signature_of", "weight_hashes", "write_adapter"]

if TYPE_CHECKING:
    from llmstack.models.artifact import Artifact
    from llmstack.registry import ArtifactRef, Manifest, Registry


# --------------------------------------------------------------------------- base identity


def base_weight_hashes(registry: Registry, ref: ArtifactRef | str) -> dict[str, str]:
    """The weight hashes of a registered model, read from its manifest (no download)."""
    manifest = registry.manifest(ref)
    return {rel: info["sha256"] for rel, info in manifest.files.items()
            if rel.endswith(".safetensors") and "/" not in rel}


def model_signature_of(config: Any) -> dict[str, Any]:
    from llmstack.train.checkpoint import model_signature

    return model_signature(config)


# --------------------------------------------------------------------------- writing


def write_adapter(directory: Path, *, method: str, trainable: dict[str, Any], base_ref: str,
                  base_hashes: dict[str, str], base_config: Any, factory: Any,
                  target_modules: list[str] | None) -> Path:
    """Write an adapter directory from the checkpoint's trainable tensors (full, unsharded).

    For peft methods the tensors are loaded into a peft model on a skeleton of the base and saved with
    ``save_pretrained`` (safetensors), so the files are exactly what peft itself writes and reads. The
    skeleton is the base's architecture on the meta device: the adapter weights do not depend on the
    base's, so none are read.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if method in PEFT_METHODS:
        peft_model = apply_method(_meta_skeleton(factory), "dora" if method == "dora" else "lora", factory.lora,
                                  target_modules=target_modules, seed=factory.seed)
        expected = {n for n, p in peft_model.named_parameters() if p.requires_grad}
        missing = sorted(expected - set(trainable))
        if missing:
            raise RuntimeError(f"the final checkpoint lacks adapter tensors {missing[:4]} "
                               f"({len(missing)} of {len(expected)}); it is not a complete adapter")
        result = peft_model.load_state_dict({k: v for k, v in trainable.items() if k in expected}, strict=False,
                                            assign=True)
        if result.unexpected_keys:
            raise RuntimeError(f"checkpoint tensors do not fit the adapter: {result.unexpected_keys[:4]}")
        peft_model.save_pretrained(str(directory), safe_serialization=True)
        (directory / "README.md").unlink(missing_ok=True)  # peft's empty model card
    elif method == "bitfit":
        save_file({k: v.detach().contiguous() for k, v in trainable.items()}, str(directory / NORM_SCALES_FILE))
    else:
        raise ConfigError(f"method {method!r} does not produce an adapter")
    info = {"format": 1, "method": method, "description": METHOD_DESCRIPTIONS[method], "base": base_ref,
            "base_weights_sha256": base_hashes, "base_signature": model_signature_of(base_config),
            "target_modules": target_modules, "tensors": len(trainable),
            "quantization": dict(NF4_SETTINGS) if method == "qlora" else None}
    (directory / ADAPTER_INFO_FILE).write_text(json.dumps(info, indent=1, sort_keys=True), encoding="utf-8")
    return directory


def _meta_skeleton(factory: Any) -> Any:
    """The base's architecture (its config.json) on the meta device: shapes and module names, no weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmstack.models.artifact import describe_artifact

    directory = describe_artifact(factory.base, registry=factory.registry).directory
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(directory)))


# --------------------------------------------------------------------------- lineage check


def adapter_manifest(registry: Registry, adapter: ArtifactRef | str) -> Manifest:
    manifest = registry.manifest(adapter)
    if manifest.kind != "adapter":
        raise ModelLoadError(f"{manifest.ref} is a {manifest.kind}, not an adapter; load it with "
                             "llmstack.models.load_artifact instead")
    if not manifest.parents:
        raise ModelLoadError(f"adapter {manifest.ref} records no base model in its lineage; it cannot be applied")
    return manifest


def describe_adapter(registry: Registry, adapter_ref: ArtifactRef | str, *, base: str | None = None) -> Artifact:
    """The adapter version, pinned to the base it is to run on: its own, or ``base`` once checked.

    ``base`` None means the adapter's own base (its lineage parent). A registry ref must be exactly
    that version; a local directory must hold weight files with the same sha256
    (:func:`llmstack.models.check_adapter_base`). A QLoRA adapter runs on the NF4 form of either.

    Raises:
        ModelLoadError: not an adapter, no lineage, or ``base`` is not the model it was trained on.
    """
    from llmstack.models.artifact import adapter_on, describe_artifact

    adapter = describe_artifact(adapter_manifest(registry, adapter_ref).ref, registry=registry)
    return adapter if base is None else adapter_on(adapter, describe_artifact(base, registry=registry))


# --------------------------------------------------------------------------- loading and merging


def _on_dequantized_base(adapter: Artifact, *, dtype: str = "auto") -> tuple[Any, Any]:
    """The QLoRA adapter attached (as ``"default"``) to its NF4 base dequantized to float linears (``dtype``
    ``"auto"``: the float base's stored dtype; the dequantization itself is computed in float32)."""
    from llmstack.models.adapters import attach_adapter
    from llmstack.models.artifact import load_artifact_tokenizer, load_weights, resolve_dtype
    from llmstack.models.loading import cast_parameters
    from llmstack.models.nf4 import dequantize_4bit_linears

    model = load_weights(adapter.base)
    dequantize_4bit_linears(model)
    cast_parameters(model, resolve_dtype(dtype, adapter.base.directory, where=adapter.base.label))
    return attach_adapter(model, adapter, "default"), load_artifact_tokenizer(adapter)


def merged_model(registry: Registry, adapter_ref: ArtifactRef | str, *,
                 base: str | None = None) -> tuple[Any, Any, Manifest]:
    """``(model, tokenizer, adapter manifest)``: a plain model with the adapter folded in, in the base's dtype.

    The fold is computed in float32 (base and adapter weights upcast) and the result rounded once to the
    dtype the base is stored in, so a bf16 base gives a bf16 merged model. QLoRA adapters are merged into
    the *dequantized* NF4 base (the weights they were trained against), so the merged model reproduces
    the QLoRA model's outputs.
    """
    from llmstack.models.adapters import fold_default_adapter
    from llmstack.models.artifact import load_artifact, stored_dtype
    from llmstack.models.loading import cast_parameters

    adapter = describe_adapter(registry, adapter_ref, base=base)
    if adapter.base is None:
        raise ModelLoadError(f"adapter {adapter.label} records no base model; it cannot be merged")
    if adapter.method == "qlora":
        model, tokenizer = _on_dequantized_base(adapter, dtype="float32")
    else:
        loaded = load_artifact(adapter, dtype="float32")
        model, tokenizer = loaded.model, loaded.tokenizer
    model = fold_default_adapter(model)
    cast_parameters(model, stored_dtype(adapter.base.directory))
    for param in model.parameters():
        param.requires_grad_(False)
    model.eval()
    return model, tokenizer, registry.manifest(adapter.ref)


def merge_adapter(registry: Registry, adapter_ref: ArtifactRef | str, *, name: str | None = None,
                  base: str | None = None) -> ArtifactRef:
    """Fold an adapter into its base and register the result (kind ``model``, parents adapter + base).

    Args:
        registry: the registry holding the adapter and its base.
        adapter_ref: the adapter version.
        name: registry name of the merged model (default ``<adapter name>-merged``).
        base: optional base override, checked against the adapter's lineage.

    Returns:
        The merged model's ref.

    Example:
        >>> merge_adapter(Registry(), "tiny-lm-lora@v1")  # doctest: +SKIP
        ArtifactRef(name='tiny-lm-lora-merged', version=1)
    """
    from llmstack.models import register_model
    from llmstack.models.loading import model_dtype_name

    model, tokenizer, manifest = merged_model(registry, adapter_ref, base=base)
    method = manifest.extra.get("method") or manifest.config.get("lora", {}).get("method")
    dtype = model_dtype_name(model)
    return register_model(
        registry, name or f"{manifest.ref.name}-merged", model, tokenizer, kind="model",
        parents=[str(manifest.ref), manifest.parents[0]], config=manifest.config, metrics=manifest.metrics,
        data_fingerprint=manifest.data_fingerprint,
        extra={"merged_from": str(manifest.ref), "method": method, "dtype": dtype,
               "merge": (f"adapter folded into the dequantized NF4 base in float32, written in {dtype}"
                         if method == "qlora" else f"adapter folded into the base in float32, written in {dtype}")})
