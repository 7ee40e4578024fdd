"""Adapter artifacts: write them from a checkpoint, load them onto their base, merge them.

An adapter version in the registry is a directory::

    adapter_config.json        peft LoRA/DoRA config            (lora, qlora, dora)
    adapter_model.safetensors  peft adapter weights             (lora, qlora, dora)
    norm_scales.safetensors    the tuned RMSNorm scales         (bitfit)
    llmstack_adapter.json      method, base ref, base weight hashes, base architecture

Its manifest's first parent is the base it was trained on. Loading or merging onto any other base
is refused: the base must be that registry version, or a directory whose weight files hash to it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmstack.errors import ConfigError, ModelLoadError
from llmstack.finetune.methods import (METHOD_DESCRIPTIONS, NF4_SETTINGS, PEFT_METHODS, apply_method,
                                       dequantize_4bit_linears, load_base)

if TYPE_CHECKING:
    from llmstack.registry import ArtifactRef, Manifest, Registry

ADAPTER_INFO_FILE = "llmstack_adapter.json"
NORM_SCALES_FILE = "norm_scales.safetensors"


# --------------------------------------------------------------------------- base identity


def weight_hashes(directory: Path) -> dict[str, str]:
    """sha256 of each ``*.safetensors`` file of a model directory (what identifies its weights)."""
    hashes = {}
    for path in sorted(Path(directory).glob("*.safetensors")):
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        hashes[path.name] = digest.hexdigest()
    return hashes


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

    For peft methods the tensors are loaded into a peft model on an fp32 copy of the base and saved
    with ``save_pretrained`` (safetensors), so the files are exactly what peft itself writes and
    reads. The base copy is only a skeleton: the adapter weights do not depend on it.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if method in PEFT_METHODS:
        model, _ = load_base(factory.base, registry=factory.registry, method="lora")
        peft_model = apply_method(model, "dora" if method == "dora" else "lora", factory.lora,
                                  target_modules=target_modules, seed=factory.seed)
        expected = {n for n, p in peft_model.named_parameters() if p.requires_grad}
        missing = sorted(expected - set(trainable))
        if missing:
            raise RuntimeError(f"the final checkpoint lacks adapter tensors {missing[:4]} "
                               f"({len(missing)} of {len(expected)}); it is not a complete adapter")
        result = peft_model.load_state_dict({k: v for k, v in trainable.items() if k in expected}, strict=False)
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


# --------------------------------------------------------------------------- lineage check


def adapter_manifest(registry: Registry, adapter: ArtifactRef | str) -> Manifest:
    manifest = registry.manifest(adapter)
    if manifest.kind != "adapter":
        raise ModelLoadError(f"{manifest.ref} is a {manifest.kind}, not an adapter; load it with "
                             "llmstack.models.load_model instead")
    if not manifest.parents:
        raise ModelLoadError(f"adapter {manifest.ref} records no base model in its lineage; it cannot be applied")
    return manifest


def check_base(registry: Registry, manifest: Manifest, info: dict[str, Any], base: str | None) -> str:
    """Return the model source to load under the adapter, refusing a base it was not trained on.

    ``base`` None means the adapter's own base (its lineage parent). A registry ref must resolve to
    exactly that version; a local directory must hold weight files with the recorded sha256.

    Raises:
        ModelLoadError: ``base`` is not the model the adapter was trained on.
    """
    trained_on = manifest.parents[0]
    if base is None:
        return trained_on
    from llmstack.models import resolve_model_source

    resolved = resolve_model_source(str(base), registry=registry)
    if resolved.ref is not None:
        if str(resolved.ref) != trained_on:
            raise ModelLoadError(
                f"adapter {manifest.ref} was trained on {trained_on} (its lineage), not {resolved.ref}; "
                f"refusing to apply it to a different base. Load it on {trained_on}, or fine-tune a new "
                f"adapter on {resolved.ref}")
        return trained_on
    recorded = info.get("base_weights_sha256") or {}
    found = weight_hashes(resolved.directory)
    if not recorded or found != recorded:
        raise ModelLoadError(
            f"adapter {manifest.ref} was trained on {trained_on} (its lineage), and the weights in {base} are "
            f"not that model's (sha256 differs); refusing to apply it to a different base")
    return str(resolved.directory)


def read_adapter_info(directory: Path, where: str) -> dict[str, Any]:
    """The adapter's ``llmstack_adapter.json``; a plain peft adapter directory reads as lora/dora."""
    path = Path(directory) / ADAPTER_INFO_FILE
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    peft_config = Path(directory) / "adapter_config.json"
    if peft_config.is_file():  # registered by other tools: lineage is all we can check
        config = json.loads(peft_config.read_text(encoding="utf-8"))
        return {"method": "dora" if config.get("use_dora") else "lora"}
    raise ModelLoadError(f"{where} has neither {ADAPTER_INFO_FILE} nor a peft adapter_config.json: not an adapter")


# --------------------------------------------------------------------------- loading and merging


def load_adapter_model(registry: Registry, adapter_ref: ArtifactRef | str, *, base: str | None = None,
                       dequantize: bool = False) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)``: the adapter's base with the adapter applied, ready for inference.

    The base is the adapter's lineage parent unless ``base`` is given, and then it must be that
    same model (see :func:`check_base`). QLoRA adapters run on an NF4 base as trained
    (``dequantize=True``: on the dequantized fp32 copy instead, which needs bitsandbytes only to
    dequantize). BitFit adapters overwrite the base's norm scales.

    Args:
        registry: where the adapter (and its base) are registered.
        adapter_ref: the adapter version, e.g. ``"tiny-lm-lora@v2"``.
        base: optional base override (registry ref or local directory), checked against lineage.
        dequantize: QLoRA only: load the base as fp32 dequantized NF4 weights.

    Returns:
        ``(model, tokenizer)`` in eval mode; for peft methods ``model`` is a ``PeftModel``.

    Raises:
        ModelLoadError: not an adapter, no lineage, or a base it was not trained on.

    Example:
        >>> model, tokenizer = load_adapter_model(Registry(), "tiny-lm-lora@v1")  # doctest: +SKIP
    """
    manifest = adapter_manifest(registry, adapter_ref)
    directory = registry.fetch(manifest.ref)
    info = read_adapter_info(directory, str(manifest.ref))
    source = check_base(registry, manifest, info, base)
    method = info["method"]
    model, tokenizer = load_base(source, registry=registry, method="qlora" if method == "qlora" else "lora")
    if method == "qlora" and dequantize:
        dequantize_4bit_linears(model)
    return _apply_adapter(model, directory, method, str(manifest.ref)), tokenizer


def _apply_adapter(model: Any, directory: Path, method: str, where: str) -> Any:
    if method in PEFT_METHODS:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, str(directory), is_trainable=False)
        except Exception as exc:
            raise ModelLoadError(f"cannot apply adapter {where}: {exc}") from None
    elif method == "bitfit":
        from safetensors.torch import load_file

        scales = load_file(str(Path(directory) / NORM_SCALES_FILE))
        result = model.load_state_dict(scales, strict=False)
        if result.unexpected_keys:
            raise ModelLoadError(f"adapter {where} holds norm scales the base lacks: {result.unexpected_keys[:4]}")
    else:
        raise ModelLoadError(f"adapter {where} has unknown method {method!r}")
    model.eval()
    return model


def merged_model(registry: Registry, adapter_ref: ArtifactRef | str, *, base: str | None = None) -> tuple[Any, Any, Manifest]:
    """``(model, tokenizer, adapter manifest)``: a plain fp32 model with the adapter folded in.

    QLoRA adapters are merged into the *dequantized* NF4 base (the weights they were trained
    against), in fp32, so the merged model reproduces the QLoRA model's outputs.
    """
    manifest = adapter_manifest(registry, adapter_ref)
    directory = registry.fetch(manifest.ref)
    info = read_adapter_info(directory, str(manifest.ref))
    source = check_base(registry, manifest, info, base)
    method = info["method"]
    model, tokenizer = load_base(source, registry=registry, method="qlora" if method == "qlora" else "lora")
    if method == "qlora":
        dequantize_4bit_linears(model)
    model = _apply_adapter(model, directory, method, str(manifest.ref))
    if method in PEFT_METHODS:
        model = model.merge_and_unload(safe_merge=True)
    for param in model.parameters():
        param.requires_grad_(False)
    model.eval()
    return model, tokenizer, manifest


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

    model, tokenizer, manifest = merged_model(registry, adapter_ref, base=base)
    method = manifest.extra.get("method") or manifest.config.get("lora", {}).get("method")
    return register_model(
        registry, name or f"{manifest.ref.name}-merged", model, tokenizer, kind="model",
        parents=[str(manifest.ref), manifest.parents[0]], config=manifest.config, metrics=manifest.metrics,
        data_fingerprint=manifest.data_fingerprint,
        extra={"merged_from": str(manifest.ref), "method": method,
               "merge": ("adapter folded into the dequantized NF4 base (fp32)" if method == "qlora"
                         else "adapter folded into the fp32 base")})
