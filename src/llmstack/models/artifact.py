"""One way to say what a source names and to load it: every stage describes, then loads, through here.

:func:`describe_artifact` answers, once and without loading weights, "is this a registry ref, a local
directory, an fsspec URL or a hub id, and is it a full model, an adapter (LoRA, DoRA, QLoRA, BitFit)
or a quantized model?" A registry alias is resolved to ``name@vN`` here and never again: the
:class:`Artifact` it returns is pinned, and an adapter's ``base`` is the pinned version it was
trained on (for QLoRA the NF4 base that training used). :func:`load_artifact` turns an artifact
into a model and tokenizer in eval mode: the one loader every stage uses, with one result type
(:class:`LoadedArtifact`). Weights are read as safetensors only; nothing unpickles.

Quantized versions are rebuilt by the backend that wrote them. This package does not import
:mod:`llmstack.quantize` (which imports it): a backend registers itself with
:func:`register_quantized_loader`, and the first quantized artifact to load looks the loaders up,
importing the packages named in :data:`QUANTIZED_LOADER_PACKAGES` by name only then.

Registry versions are read from :meth:`Registry.fetch`, which hands out a folder holding exactly the
manifest's files (it refuses one with anything else in it), so nothing outside the manifest loads.

Example:
    >>> artifact = describe_artifact("tiny-lm-lora@latest")  # doctest: +SKIP
    >>> artifact.kind, artifact.method, str(artifact.ref), str(artifact.base.ref)  # doctest: +SKIP
    ('adapter', 'lora', 'tiny-lm-lora@v1', 'tiny-lm-base@v1')
    >>> loaded = load_artifact(artifact)  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmstack.errors import ArtifactNotFoundError, ModelLoadError

if TYPE_CHECKING:
    from llmstack.registry import ArtifactRef, Registry

#: What :func:`describe_artifact` reports in ``Artifact.kind``.
KINDS = ("model", "adapter", "quantized", "tokenizer")
RECIPE_FILE = "quantization.json"  # written by llmstack.quantize into every quantized version
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}
AUTO_DTYPE = "auto"  # the dtype the model's config.json records (float32 when it records none)


@dataclass(frozen=True)
class Artifact:
    """What a source names, resolved once and pinned; no weights loaded."""

    kind: str  # "model" | "adapter" | "quantized" | "tokenizer"
    method: str | None  # adapters: lora | dora | qlora | bitfit ...; quantized: its method; models: None
    directory: Path  # local directory holding exactly the manifest's files
    ref: ArtifactRef | None  # pinned name@vN when it came from the registry
    base: Artifact | None  # adapters: the base they were trained on (pinned; for qlora the NF4 base it implies)
    identity: str  # content identity for cache keys: registry-url::name@vN, or a hash of a directory's files
    source: str  # what the caller named (e.g. tiny-lm@production)
    quantize_on_load: bool = False  # float weights quantized (``method``) as they load: a QLoRA adapter's base

    @property
    def name(self) -> str:
        """The registry name, else the directory's (or hub repository's) name."""
        if self.ref is not None:
            return self.ref.name
        return Path(self.source.rstrip("/")).name or self.directory.name

    @property
    def label(self) -> str:
        """How messages name it: ``name@vN``, else what the caller named; NF4 bases say so."""
        shown = str(self.ref) if self.ref is not None else self.source
        return f"{shown} (quantized to NF4 on load)" if self.quantize_on_load else shown

    def __str__(self) -> str:
        return self.label


@dataclass
class LoadedArtifact:
    """What :func:`load_artifact` returns: the model and tokenizer, with the artifact they came from."""

    artifact: Artifact
    model: Any  # eval mode; for an adapter: the base with the adapter applied (attached as "default")
    tokenizer: Any  # None when loaded with ``with_tokenizer=False``

    @property
    def label(self) -> str:
        """How messages name it: ``name@vN``, else what the caller named."""
        return self.artifact.label

    @property
    def ref(self) -> ArtifactRef | None:
        """The pinned registry version, None for a directory, URL or hub id."""
        return self.artifact.ref


# --------------------------------------------------------------------------- describing


def describe_artifact(source: str | os.PathLike[str] | ArtifactRef | Artifact, *, registry: Registry | None = None,
                      storage_options: dict[str, Any] | None = None) -> Artifact:
    """Say what ``source`` is, resolving a registry alias once; no weights are loaded.

    ``source`` is tried in this order: an :class:`Artifact` (returned as is), an ``ArtifactRef``, a
    local directory, a ``.gguf`` file (imported into ``registry`` once, see :mod:`llmstack.models.gguf`;
    the only case that writes), an fsspec URL of a directory (``s3://…``, ``memory://…``; copied to a local cache
    with ``storage_options``), a registry reference (``name``, ``name@vN``, ``name@alias``), then a
    hub id (``org/name``). An adapter's ``base`` is described too: its lineage parent for registry
    versions, the base recorded in its files for directories.

    Raises:
        ArtifactNotFoundError: a registry reference names no version, alias or artifact.
        ModelLoadError: ``source`` is none of the above, or not a model, adapter, quantized model or
            tokenizer (the message says what was found and what is accepted).

    Example:
        >>> describe_artifact("tiny-lm@production").ref  # doctest: +SKIP
        ArtifactRef(name='tiny-lm', version=2)
    """
    from llmstack.registry import ArtifactRef, Registry

    if isinstance(source, Artifact):
        return source
    if isinstance(source, ArtifactRef):
        return _describe_registered(source, registry or Registry(), str(source))
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str) or not source:
        raise ModelLoadError("expected a registry reference, a directory, a .gguf file, an fsspec URL or a hub "
                             f"id; got {source!r}")
    path = Path(source).expanduser()
    if path.is_dir():
        return _describe_directory(path, source=source, registry=registry)
    if path.suffix.lower() == ".gguf" and path.is_file():  # imported once (by sha256), then a registry version
        from llmstack.models.gguf import import_gguf

        registry = registry or Registry()
        return _describe_registered(import_gguf(path, registry), registry, source)
    if "://" in source:
        return _describe_directory(_fetch_url_directory(source, storage_options or {}), source=source,
                                   registry=registry)
    if ArtifactRef.looks_like(source):
        registry = registry or Registry()
        try:
            ref = registry.resolve(source)
        except ArtifactNotFoundError:
            if "@" in source:
                raise
        else:
            return _describe_registered(ref, registry, source)
    if "/" in source and not source.startswith(("/", ".", "~")):
        snapshot = _fetch_hub(source)
        return _describe_directory(snapshot, source=source, registry=registry, identity=f"hub:{source}@{snapshot.name}")
    raise ModelLoadError(
        f"model source {source!r} is neither a registry artifact, a local directory, a .gguf file, an fsspec URL "
        "nor a hub id (org/name); run `llmstack registry list` to see what is registered")


def _describe_registered(ref: ArtifactRef, registry: Registry, source: str) -> Artifact:
    manifest = registry.manifest(ref)
    ref = manifest.ref
    directory = Path(registry.fetch(ref))
    identity = f"{registry.url}::{ref}"
    if manifest.kind == "adapter":
        if not manifest.parents:
            raise ModelLoadError(f"adapter {ref} records no base model in its lineage; it cannot be applied")
        base = describe_artifact(manifest.parents[0], registry=registry)
        return _adapter_artifact(directory, ref=ref, base=base, identity=identity, source=source)
    if manifest.kind in ("model", "quantized", "tokenizer"):
        if manifest.kind == "quantized" or _classify(directory, str(ref))[0] == "quantized":
            return Artifact("quantized", _quantized_method(directory, str(ref)), directory, ref, None, identity,
                            source)
        return Artifact(manifest.kind, None, directory, ref, None, identity, source)
    raise ModelLoadError(f"{ref} is a {manifest.kind}, not a model; llmstack loads models, adapters, quantized "
                         "models and tokenizers")


def _describe_directory(directory: Path, *, source: str, registry: Registry | None,
                        identity: str | None = None) -> Artifact:
    kind, method = _classify(directory, source)
    identity = identity or directory_identity(directory)
    if kind == "adapter":
        return _adapter_artifact(directory, ref=None, base=_recorded_base(directory, source, registry),
                                 identity=identity, source=source)
    return Artifact(kind, method, directory, None, None, identity, source)


def _classify(directory: Path, where: str) -> tuple[str, str | None]:
    """``(kind, method)`` from the files a directory holds."""
    from llmstack.models.adapters import ADAPTER_INFO_FILE, PEFT_CONFIG_FILE

    if (directory / ADAPTER_INFO_FILE).is_file() or (directory / PEFT_CONFIG_FILE).is_file():
        return "adapter", None
    if (directory / RECIPE_FILE).is_file():
        return "quantized", _quantized_method(directory, where)
    if (directory / "config.json").is_file():
        if "quantization_config" in _read_json(directory / "config.json", where):
            return "quantized", _quantized_method(directory, where)
        return "model", None
    if any((directory / name).is_file() for name in TOKENIZER_FILES):
        return "tokenizer", None
    found = ", ".join(sorted(p.name for p in directory.iterdir())[:8]) or "nothing"
    raise ModelLoadError(
        f"{where} is not a model directory: it holds {found}; expected config.json + *.safetensors (a model), "
        f"{ADAPTER_INFO_FILE} or {PEFT_CONFIG_FILE} (an adapter), or {RECIPE_FILE} (a quantized model)")


def _quantized_method(directory: Path, where: str) -> str:
    if (directory / RECIPE_FILE).is_file():
        return str(_read_json(directory / RECIPE_FILE, where).get("method"))
    config = _read_json(directory / "config.json", where) if (directory / "config.json").is_file() else {}
    return str(config.get("quantization_config", {}).get("quant_method", "unknown"))


def _read_json(path: Path, where: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{where}: cannot read {path.name} ({exc})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{where}: {path.name} is not a JSON object")
    return data


def _adapter_artifact(directory: Path, *, ref: ArtifactRef | None, base: Artifact | None, identity: str,
                      source: str) -> Artifact:
    from llmstack.models.adapters import read_adapter_info

    info = read_adapter_info(directory, str(ref or source))
    method = str(info["method"])
    if base is not None and base.kind == "adapter":
        raise ModelLoadError(f"adapter {ref or source} records another adapter ({base.label}) as its base; "
                             "merge that one first (llmstack.finetune.merge_adapter)")
    if base is not None and method == "qlora":
        base = nf4_base_of(base, adapter=str(ref or source))
    if base is not None:
        identity = f"{base.identity}+{identity}"
    return Artifact("adapter", method, directory, ref, base, identity, source)


def rebased(adapter: Artifact, base: Artifact) -> Artifact:
    """``adapter`` pinned to run on ``base`` instead of its recorded one (check that first:
    :func:`llmstack.models.check_adapter_base`); its identity follows the new base."""
    own = adapter.identity.removeprefix(f"{adapter.base.identity}+") if adapter.base else adapter.identity
    return replace(adapter, base=base, identity=f"{base.identity}+{own}")


def nf4_base_of(base: Artifact, *, adapter: str) -> Artifact:
    """The NF4 base a QLoRA adapter implies: ``base``'s float weights, quantized to NF4 as they load."""
    if base.quantize_on_load:
        return base
    if base.kind != "model":
        raise ModelLoadError(f"QLoRA adapter {adapter} needs a float base to quantize to NF4, but {base.label} is "
                             f"a {base.kind}")
    return Artifact("quantized", "nf4", base.directory, base.ref, None, f"{base.identity}+nf4", base.source,
                    quantize_on_load=True)


def _recorded_base(directory: Path, where: str, registry: Registry | None) -> Artifact | None:
    """The base an adapter directory names (``llmstack_adapter.json``, else peft's config), or None."""
    from llmstack.models.adapters import ADAPTER_INFO_FILE, PEFT_CONFIG_FILE

    named = []
    if (directory / ADAPTER_INFO_FILE).is_file():
        named.append(_read_json(directory / ADAPTER_INFO_FILE, where).get("base"))
    if (directory / PEFT_CONFIG_FILE).is_file():
        named.append(_read_json(directory / PEFT_CONFIG_FILE, where).get("base_model_name_or_path"))
    named = [str(n) for n in named if n]
    if not named:
        return None
    problems = []
    for candidate in named:
        try:
            return describe_artifact(candidate, registry=registry)
        except (ArtifactNotFoundError, ModelLoadError) as exc:
            problems.append(str(exc))
    raise ModelLoadError(f"adapter {where} was trained on {' / '.join(named)}, which cannot be found here: "
                         f"{'; '.join(problems)}")


def directory_identity(directory: Path, *, content: bool = False) -> str:
    """``dir:<sha256>`` over every file's relative path and size and modification time (and the folder's own
    path), so it changes when a file does; ``content``: over relative paths and file sha256 instead."""
    from llmstack.registry._registry import hash_file

    digest = hashlib.sha256(b"" if content else str(directory.resolve()).encode())
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            stat = path.stat()
            what = hash_file(path, memo=True) if content else f"{stat.st_size}:{stat.st_mtime_ns}"
            digest.update(f"{path.relative_to(directory).as_posix()}:{what}\n".encode())
    return "dir:" + digest.hexdigest()[:32]


def _fetch_url_directory(url: str, storage_options: dict[str, Any]) -> Path:
    """Copy a remote directory (any fsspec URL) into the local cache, keyed by its content: exactly its files."""
    import shutil

    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(url, **storage_options)
        remote_files = [f for f in fs.find(root) if not fs.isdir(f)]
    except Exception as exc:
        raise ModelLoadError(f"cannot read {url} ({type(exc).__name__}: {exc})") from None
    if not remote_files:
        raise ModelLoadError(f"{url} holds no files")
    cache = Path(os.environ.get("LLMSTACK_CACHE") or Path("~/.cache/llmstack").expanduser()) / "urls"
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=cache))
    try:
        prefix = root.rstrip("/") + "/"
        for remote in remote_files:
            dest = staging.joinpath(*remote[len(prefix):].split("/"))
            dest.parent.mkdir(parents=True, exist_ok=True)
            fs.get(remote, str(dest))
        target = cache / directory_identity(staging, content=True).removeprefix("dir:")
        if not target.is_dir():
            try:
                os.rename(staging, target)
            except OSError:  # another process stored the same content first
                if not target.is_dir():
                    raise
        return target
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _fetch_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as exc:  # offline, unknown repo, gated repo: all the same to the user
        raise ModelLoadError(
            f"cannot fetch hub model {repo_id!r} ({type(exc).__name__}); this machine may be offline. "
            "Download it elsewhere (huggingface-cli download) and pass the local directory instead, "
            "e.g. model.source=/path/to/model") from None


# --------------------------------------------------------------------------- loading


def load_artifact(source: str | os.PathLike[str] | ArtifactRef | Artifact, *, registry: Registry | None = None,
                  base: str | os.PathLike[str] | ArtifactRef | Artifact | None = None, dtype: str = AUTO_DTYPE,
                  device: str = "cpu", with_tokenizer: bool = True) -> LoadedArtifact:
    """Load what ``source`` names (see :func:`describe_artifact`) for inference or training, in eval mode.

    Every kind fine-tuning and quantization produce loads: full and merged models (in ``dtype``;
    ``"auto"``, the default, is the dtype the model's ``config.json`` records, float32 when it records
    none); quantized versions, rebuilt from their recipe by the backend that wrote them (their dtype is
    the recipe's); adapters on the base they were trained on, attached as ``"default"`` (LoRA, DoRA,
    BitFit; QLoRA on its NF4 base). An adapter's tokenizer is its own when its files hold one,
    else its base's.

    Args:
        source: a registry reference, directory, ``.gguf`` file, fsspec URL, hub id or described artifact.
        registry: where registry references resolve (None: the default registry).
        base: adapters only: run on this base instead of the recorded one; it must hold the weights the
            adapter was trained on (:func:`~llmstack.models.check_adapter_base`).
        dtype: ``"auto"`` or a float dtype name (``float32``, ``bf16``...).
        device: where the weights go (``"cpu"``, ``"cuda"``...).
        with_tokenizer: False leaves ``tokenizer`` None (one read fewer).

    Raises:
        ArtifactNotFoundError: a registry reference names nothing.
        ModelLoadError: not loadable as a model (the message names what was found), an adapter offered a
            base it was not trained on, ``base`` given for something other than an adapter, or ``dtype``
            is not one this machine can compute in.

    Example:
        >>> loaded = load_artifact("tiny-lm@production")  # doctest: +SKIP
        >>> loaded.model(**loaded.tokenizer("def ", return_tensors="pt")).logits.shape  # doctest: +SKIP
    """
    artifact = describe_artifact(source, registry=registry)
    if base is not None:
        artifact = adapter_on(artifact, describe_artifact(base, registry=registry))
    model = load_weights(artifact, dtype=dtype, device=device)
    tokenizer = load_artifact_tokenizer(artifact) if with_tokenizer else None
    model.eval()
    return LoadedArtifact(artifact, model, tokenizer)


def adapter_on(adapter: Artifact, base: Artifact) -> Artifact:
    """``adapter`` pinned to run on ``base`` once checked to be the model it was trained on (a QLoRA adapter: on
    ``base``'s NF4 form).

    Raises:
        ModelLoadError: ``adapter`` is not an adapter, or ``base`` is not the model it was trained on.
    """
    from llmstack.models.adapters import check_adapter_base

    if adapter.kind != "adapter":
        raise ModelLoadError(f"{adapter.label} is a {adapter.kind}, not an adapter; only adapters load on another "
                             "base (leave base unset to load it as it is)")
    if adapter.method == "qlora" and base.kind == "model":
        base = nf4_base_of(base, adapter=adapter.label)
    check_adapter_base(adapter, base)
    return rebased(adapter, base)


def stored_dtype(directory: Path) -> str:
    """The dtype a model directory's ``config.json`` records (``dtype``, else the older ``torch_dtype``),
    as ``float32`` / ``bfloat16`` / ``float16``; float32 when it records none (or no float type)."""
    path = Path(directory) / "config.json"
    config = _read_json(path, str(directory)) if path.is_file() else {}
    recorded = config.get("dtype") or config.get("torch_dtype")
    if not recorded and isinstance(config.get("text_config"), dict):  # multimodal wrappers record it per part
        recorded = config["text_config"].get("dtype") or config["text_config"].get("torch_dtype")
    return _DTYPES.get(str(recorded).removeprefix("torch."), "float32")


def resolve_dtype(dtype: str, directory: Path, *, device: str = "cpu", where: str = "") -> str:
    """``dtype`` as a canonical name (``"auto"``: :func:`stored_dtype`), checked to compute on ``device``.

    Raises:
        ModelLoadError: an unknown name, or a dtype this machine cannot compute in (says which).
    """
    if dtype != AUTO_DTYPE and dtype not in _DTYPES:
        raise ModelLoadError(f"dtype {dtype!r} is not one of auto, {', '.join(sorted(_DTYPES))}")
    name = stored_dtype(directory) if dtype == AUTO_DTYPE else _DTYPES[dtype]
    problem = _dtype_problem(name, device)
    if problem:
        asked = f" ({where}'s stored dtype)" if dtype == AUTO_DTYPE and where else ""
        raise ModelLoadError(f"dtype {name}{asked} cannot run on {device} here: {problem}; "
                             "ask for another dtype (e.g. dtype=float32)")
    return name


_DTYPE_PROBLEMS: dict[tuple[str, str], str | None] = {}


def _dtype_problem(name: str, device: str) -> str | None:
    """Why a matmul in ``name`` fails on ``device`` (None when it works); probed once per process."""
    key = (name, device)
    if key not in _DTYPE_PROBLEMS:
        import torch

        try:
            probe = torch.ones(2, 8, dtype=getattr(torch, name), device=device)
            torch.nn.functional.linear(probe, probe).sum().item()
            _DTYPE_PROBLEMS[key] = None
        except Exception as exc:  # noqa: BLE001 - any failure means "cannot compute in it here"
            _DTYPE_PROBLEMS[key] = f"{type(exc).__name__}: {exc}"
    return _DTYPE_PROBLEMS[key]


def load_weights(artifact: Artifact, *, dtype: str = AUTO_DTYPE, device: str = "cpu") -> Any:
    """The model of ``artifact`` (no tokenizer); adapters come attached to their base as ``"default"``.

    ``dtype``: ``"auto"`` keeps the dtype the model was stored in (an adapter: its base's).
    """
    if dtype != AUTO_DTYPE and dtype not in _DTYPES:
        raise ModelLoadError(f"dtype {dtype!r} is not one of auto, {', '.join(sorted(_DTYPES))}")
    if artifact.kind == "adapter":
        from llmstack.models.adapters import attach_adapter

        if artifact.base is None:
            raise ModelLoadError(f"adapter {artifact.label} records no base model; attach it to a loaded base "
                                 "with llmstack.models.attach_adapter instead")
        return attach_adapter(load_weights(artifact.base, dtype=dtype, device=device), artifact, "default")
    if artifact.kind == "tokenizer":
        raise ModelLoadError(f"{artifact.label} is a tokenizer, not a model; load it with "
                             "llmstack.models.load_tokenizer")
    if artifact.quantize_on_load:
        from llmstack.models.nf4 import load_nf4_model

        return load_nf4_model(artifact.directory, device=device, where=artifact.label)
    if artifact.kind == "quantized" and (artifact.directory / RECIPE_FILE).is_file():
        return _rebuild_quantized(artifact)
    if not any(artifact.directory.glob("*.safetensors")):
        raise ModelLoadError(f"{artifact.label} holds no .safetensors weights; llmstack loads safetensors only")
    model = _from_pretrained(artifact, resolve_dtype(dtype, artifact.directory, device=device, where=artifact.label))
    return model.to(device) if device != "cpu" else model


def _from_pretrained(artifact: Artifact, dtype: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = getattr(torch, _DTYPES[dtype])
    try:
        return AutoModelForCausalLM.from_pretrained(str(artifact.directory), dtype=torch_dtype, use_safetensors=True)
    except Exception as exc:
        raise ModelLoadError(f"cannot load model from {artifact.label}: {exc}") from None


# --------------------------------------------------------------------------- quantized loaders

#: ``loader(directory, where)`` -> the quantized model saved in ``directory``, or None when it is not one the
#: loader's backend wrote (``where`` names the artifact in messages).
QuantizedLoader = Callable[[Path, str], Any]
#: Packages that register quantized loaders when imported; imported by name on the first quantized load,
#: so importing llmstack.models never imports them (they import llmstack.models).
QUANTIZED_LOADER_PACKAGES: tuple[str, ...] = ("llmstack.quantize",)
_QUANTIZED_LOADERS: dict[str, QuantizedLoader] = {}


def register_quantized_loader(name: str, loader: QuantizedLoader) -> None:
    """Let :func:`load_artifact` rebuild quantized versions with ``loader`` (first match wins, in registration
    order; registering a ``name`` again replaces its loader in place)."""
    _QUANTIZED_LOADERS[name] = loader


def quantized_loaders() -> dict[str, QuantizedLoader]:
    """The registered loaders, importing :data:`QUANTIZED_LOADER_PACKAGES` first (once each)."""
    import importlib

    for package in QUANTIZED_LOADER_PACKAGES:
        try:
            importlib.import_module(package)
        except ImportError:  # an optional backend package without its extras: its artifacts say so below
            continue
    return _QUANTIZED_LOADERS


def _rebuild_quantized(artifact: Artifact) -> Any:
    """The quantized model of ``artifact``, from the first registered loader that recognises its directory."""
    loaders = quantized_loaders()
    for loader in loaders.values():
        model = loader(artifact.directory, artifact.label)
        if model is not None:
            return model
    raise ModelLoadError(f"{artifact.label} is a quantized model ({artifact.method}) that no registered loader "
                         f"rebuilds (registered: {', '.join(loaders) or 'none'}); import the package whose backend "
                         "wrote it before loading, or load the float model it was made from")


def load_artifact_tokenizer(artifact: Artifact) -> Any:
    """The tokenizer of ``artifact``: its own files, else (adapters) its base's."""
    from transformers import AutoTokenizer

    if artifact.kind == "adapter" and not any((artifact.directory / n).is_file() for n in TOKENIZER_FILES):
        if artifact.base is None:
            raise ModelLoadError(f"adapter {artifact.label} holds no tokenizer and records no base model")
        return load_artifact_tokenizer(artifact.base)
    try:
        return AutoTokenizer.from_pretrained(str(artifact.directory))
    except Exception as exc:
        raise ModelLoadError(f"{artifact.label} has no usable tokenizer ({exc})") from None
