"""Live adapter operations on a loaded base, peft adapters (LoRA, DoRA, QLoRA) and BitFit alike.

An adapter directory holds either a peft adapter (``adapter_config.json`` + safetensors) or BitFit's
tuned biases and norm parameters (``norm_scales.safetensors``), plus llmstack's ``llmstack_adapter.json``
(method, base ref, base weight hashes). Several adapters can be attached to one base under different names;
:func:`adapter_context` runs forward passes with one of them (or the plain base) active. Outside any
context the model computes with the adapter named ``"default"`` when one is attached (what
:func:`llmstack.models.load_artifact` attaches for an adapter loaded as a model), else the plain base.

Example:
    >>> base = load_artifact("tiny-lm-base@v1").model  # doctest: +SKIP
    >>> model = attach_adapter(base, describe_artifact("tiny-lm-lora@v1"), "lora")  # doctest: +SKIP
    >>> with adapter_context(model, "lora"):  # doctest: +SKIP
    ...     logits = model(ids).logits
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ContextManager

from llmstack.errors import ModelLoadError

if TYPE_CHECKING:
    from llmstack.models.artifact import Artifact

ADAPTER_INFO_FILE = "llmstack_adapter.json"  # method, base ref, base weight hashes, base architecture
PEFT_CONFIG_FILE = "adapter_config.json"
NORM_SCALES_FILE = "norm_scales.safetensors"  # BitFit: the tuned biases and norm parameters
DEFAULT_ADAPTER = "default"  # active outside adapter_context
_STATE_ATTRIBUTE = "_llmstack_adapters"
_STALE: Any = object()  # "what the weights compute is unknown": the next activation re-applies everything


# --------------------------------------------------------------------------- reading adapter files


def read_adapter_info(directory: Path, where: str) -> dict[str, Any]:
    """The adapter's ``llmstack_adapter.json``; a plain peft adapter directory reads as its peft type."""
    path = Path(directory) / ADAPTER_INFO_FILE
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    peft_config = Path(directory) / PEFT_CONFIG_FILE
    if peft_config.is_file():  # written by other tools: no recorded base weights
        config = json.loads(peft_config.read_text(encoding="utf-8"))
        peft_type = str(config.get("peft_type") or "lora").lower()
        return {"method": "dora" if peft_type == "lora" and config.get("use_dora") else peft_type}
    raise ModelLoadError(f"{where} has neither {ADAPTER_INFO_FILE} nor a peft {PEFT_CONFIG_FILE}: not an adapter")


def weight_hashes(directory: Path) -> dict[str, str]:
    """sha256 of each ``*.safetensors`` file of a model directory (what identifies its weights)."""
    from llmstack.registry._registry import hash_file

    return {path.name: hash_file(path, memo=True) for path in sorted(Path(directory).glob("*.safetensors"))}


# --------------------------------------------------------------------------- the base check


def check_adapter_base(adapter: Artifact, base: Artifact) -> None:
    """Refuse ``base`` unless ``adapter`` was trained on it.

    Two registry versions must be the same ``name@vN``; otherwise (a directory on either side) the
    weight files must hash the same. A QLoRA adapter needs its NF4 base, never the float model. An
    adapter that records no base (a bare peft directory) cannot be checked and is accepted. ``base``
    may itself be an adapter loaded as a model: other adapters attached to it run on its base, so
    they are checked against that.

    Raises:
        ModelLoadError: naming the adapter, the base it was trained on and the base it was offered.
    """
    if adapter.kind != "adapter":
        raise ModelLoadError(f"{adapter.label} is a {adapter.kind}, not an adapter")
    if base.kind == "adapter" and base.base is not None:
        base = base.base
    trained = adapter.base
    if trained is None or trained.identity == base.identity:
        return
    if trained.ref is not None and base.ref is not None and str(trained.ref) != str(base.ref):
        raise ModelLoadError(
            f"adapter {adapter.label} was trained on {trained.ref} (its lineage), not {base.ref}; refusing to "
            f"apply it to a different base. Load it on {trained.ref}, or fine-tune a new adapter on {base.ref}")
    if trained.quantize_on_load != base.quantize_on_load or trained.kind != base.kind:
        raise ModelLoadError(
            f"adapter {adapter.label} ({adapter.method}) was trained on {trained.label}, not on {base.label} "
            f"(a {base.kind}{' quantized on load' if base.quantize_on_load else ''}); refusing to apply it to a "
            "different base. load_artifact(adapter) loads it on the base it was trained on")
    if weight_hashes(trained.directory) != weight_hashes(base.directory):
        raise ModelLoadError(
            f"adapter {adapter.label} was trained on {trained.label} (its lineage), and the weights in "
            f"{base.label} are not that model's (sha256 differs); refusing to apply it to a different base")


# --------------------------------------------------------------------------- attaching and switching


@dataclass
class _AdapterState:
    """What is attached to one base model; kept on the base itself, so peft wrapping does not lose it."""

    attached: dict[str, Artifact] = field(default_factory=dict)  # served name -> adapter, in attach order
    peft: set[str] = field(default_factory=set)  # names attached through peft
    scales: dict[str, dict[str, Any]] = field(default_factory=dict)  # bitfit name -> param name -> tuned scale
    base_scales: dict[str, Any] = field(default_factory=dict)  # param name -> the base's own value
    applied: Any = _STALE  # the name the weights compute with now (None: the plain base)

    @property
    def resting(self) -> str | None:
        return DEFAULT_ADAPTER if DEFAULT_ADAPTER in self.attached else None


def _plain_model(model: Any) -> Any:
    """The transformers model under any peft wrapper."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) and hasattr(model, "peft_config") else model


def _state(model: Any) -> _AdapterState | None:
    return _plain_model(model).__dict__.get(_STATE_ATTRIBUTE)


def _require_attached(model: Any, name: str) -> _AdapterState:
    state = _state(model)
    if state is None or name not in state.attached:
        attached = ", ".join(state.attached) if state else "none"
        raise ModelLoadError(f"no adapter is attached as {name!r}; attached: {attached}")
    return state


def _activate(model: Any, state: _AdapterState, name: str | None) -> None:
    """Make the weights compute with adapter ``name`` (None: the plain base)."""
    import torch

    if state.applied is not _STALE and state.applied == name:
        return
    if hasattr(model, "peft_config") and state.peft:
        if name in state.peft:
            model.base_model.enable_adapter_layers()
            model.set_adapter(name, inference_mode=True)
        else:
            model.base_model.disable_adapter_layers()
    if state.base_scales:
        chosen = state.scales.get(name, {}) if name is not None else {}
        params = dict(_plain_model(model).named_parameters())
        with torch.no_grad():
            for param_name, base_value in state.base_scales.items():
                params[param_name].copy_(chosen.get(param_name, base_value))
    state.applied = name


def attach_adapter(model: Any, adapter: Artifact, name: str) -> Any:
    """Attach ``adapter`` to the loaded ``model`` under ``name``; returns the model to use from now on.

    peft adapters wrap the model in a ``PeftModel`` on first attach (later ones join it); BitFit
    scales are kept aside and swapped in by :func:`adapter_context`. Check the base first with
    :func:`check_adapter_base`: attaching does not know which weights ``model`` holds.

    Raises:
        ModelLoadError: not an adapter, the name is taken, or its tensors do not fit ``model``.
    """
    from llmstack.models.artifact import Artifact

    if not isinstance(adapter, Artifact) or adapter.kind != "adapter":
        shown = adapter.label if isinstance(adapter, Artifact) else repr(adapter)
        raise ModelLoadError(f"attach_adapter expects an adapter Artifact (describe_artifact(...)); got {shown}")
    if not isinstance(name, str) or not name:
        raise ModelLoadError(f"adapter name must be a non-empty string, got {name!r}")
    plain = _plain_model(model)
    state = plain.__dict__.setdefault(_STATE_ATTRIBUTE, _AdapterState())
    if name in state.attached:
        raise ModelLoadError(f"an adapter is already attached as {name!r} ({state.attached[name].label}); "
                             "detach it first or choose another name")
    _activate(model, state, None)  # base values in place, so BitFit captures the base's own scales
    directory = adapter.directory
    if (directory / PEFT_CONFIG_FILE).is_file():
        model = _attach_peft(model, adapter, name)
        state.peft.add(name)
    elif (directory / NORM_SCALES_FILE).is_file():
        state.scales[name] = _read_scales(plain, adapter, state)
    else:
        raise ModelLoadError(f"adapter {adapter.label} holds neither {PEFT_CONFIG_FILE} nor {NORM_SCALES_FILE}")
    state.attached[name] = adapter
    state.applied = _STALE
    _activate(model, state, state.resting)
    model.eval()
    return model


def _attach_peft(model: Any, adapter: Artifact, name: str) -> Any:
    from peft import PeftModel

    try:
        if isinstance(model, PeftModel):
            model.load_adapter(str(adapter.directory), adapter_name=name, is_trainable=False)
            return model
        return PeftModel.from_pretrained(model, str(adapter.directory), adapter_name=name, is_trainable=False)
    except Exception as exc:
        raise ModelLoadError(f"cannot apply adapter {adapter.label}: {type(exc).__name__}: {exc}") from None


def _read_scales(plain: Any, adapter: Artifact, state: _AdapterState) -> dict[str, Any]:
    from safetensors.torch import load_file

    scales = load_file(str(adapter.directory / NORM_SCALES_FILE))
    params = dict(plain.named_parameters())
    unknown = [k for k in scales if k not in params]
    if unknown:
        raise ModelLoadError(f"adapter {adapter.label} holds norm scales the base lacks: {unknown[:4]}")
    misfit = [k for k, v in scales.items() if tuple(v.shape) != tuple(params[k].shape)]
    if misfit:
        raise ModelLoadError(f"adapter {adapter.label}: norm scales {misfit[:4]} do not fit the base's shapes")
    for key in scales:
        state.base_scales.setdefault(key, params[key].detach().clone())
    return {k: v.to(dtype=params[k].dtype, device=params[k].device) for k, v in scales.items()}


def adapter_context(model: Any, name: str | None) -> ContextManager[Any]:
    """A context whose forward passes run with adapter ``name`` active (None: the plain base).

    On exit the model computes as at rest again (the ``"default"`` adapter if attached, else the
    base). Contexts are for one thread at a time; they do not nest.

    Raises:
        ModelLoadError: no adapter is attached under ``name`` (raised at the call, before entering).
    """
    state = _state(model)
    if name is not None:
        state = _require_attached(model, name)
    return _switched(model, state, name)


@contextlib.contextmanager
def _switched(model: Any, state: _AdapterState | None, name: str | None) -> Iterator[Any]:
    if state is None:  # nothing attached: the plain base already
        yield model
        return
    _activate(model, state, name)
    try:
        yield model
    finally:
        _activate(model, state, state.resting)


def detach_adapter(model: Any, name: str) -> Any:
    """Drop the adapter attached as ``name``; returns the model to use (the plain base once none is left)."""
    state = _require_attached(model, name)
    _activate(model, state, None)
    if name in state.peft:
        state.peft.discard(name)
        if state.peft:
            if model.active_adapter == name:
                model.set_adapter(sorted(state.peft)[0], inference_mode=True)
            model.delete_adapter(name)
        else:
            model = model.base_model.unload()  # the last peft adapter: back to the plain model
    else:
        state.scales.pop(name)
        tuned = {key for scales in state.scales.values() for key in scales}
        state.base_scales = {k: v for k, v in state.base_scales.items() if k in tuned}
    del state.attached[name]
    if not state.attached:
        _plain_model(model).__dict__.pop(_STATE_ATTRIBUTE, None)
        return model
    state.applied = _STALE
    _activate(model, state, state.resting)
    return model


def fold_default_adapter(model: Any) -> Any:
    """The plain model with the ``"default"`` adapter folded into its weights (peft: ``merge_and_unload``)."""
    state = _require_attached(model, DEFAULT_ADAPTER)
    others = [n for n in state.attached if n != DEFAULT_ADAPTER]
    if others:
        raise ModelLoadError(f"detach the other adapters ({', '.join(others)}) before folding {DEFAULT_ADAPTER!r}")
    _activate(model, state, DEFAULT_ADAPTER)
    if DEFAULT_ADAPTER in state.peft:
        model = model.merge_and_unload(safe_merge=True)
    _plain_model(model).__dict__.pop(_STATE_ATTRIBUTE, None)
    return model
