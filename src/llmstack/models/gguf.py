"""GGUF files as model sources, and outside models imported into the registry under a name.

A ``.gguf`` file (llama.cpp's format, often block-quantized) is accepted wherever a model directory
is: :func:`llmstack.models.describe_artifact` imports it once into the registry as an ordinary
safetensors Hugging Face version, dequantized by ``transformers`` to a float dtype, and describes that
version. The version records the file's sha256 in its lineage (``gguf:sha256:<hex>``) and manifest,
so importing the same file again (in the same dtype) returns the existing version instead of a copy.

:func:`import_model` registers any outside model (a Hugging Face directory, or a GGUF file) under a
name of the user's choosing; ``llmstack registry import FILE_OR_DIR --name NAME`` is its CLI.

Example:
    >>> ref = import_model("SmolLM2-135M-Instruct.Q4_1.gguf", name="smollm2")  # doctest: +SKIP
    >>> str(ref)  # doctest: +SKIP
    'smollm2@v1'
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmstack.errors import ModelLoadError

if TYPE_CHECKING:
    from llmstack.registry import ArtifactRef, Registry

__all__ = ["GGUF_SUFFIX", "GGUFInfo", "gguf_sha256", "import_gguf", "import_model", "is_gguf", "read_gguf_info",
           "registry_name_for"]

GGUF_SUFFIX = ".gguf"
GGUF_LINEAGE_PREFIX = "gguf:sha256:"  # lineage entry of an imported GGUF file
# general.file_type values whose weights are all one float type (llama.cpp's LLAMA_FTYPE_*); the others
# are block-quantized, and their dequantized values are exact in float32.
_FLOAT_FILE_TYPES = {0: "float32", 1: "float16", 32: "bfloat16"}
_FLOAT_TENSOR_TYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
# llama.cpp architecture names transformers knows under another name (see its GGUF loader).
_ARCHITECTURE_ALIASES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss",
                         "minimax-m2": "minimax_m2", "t5encoder": "t5"}


@dataclass(frozen=True)
class GGUFInfo:
    """What a GGUF file's header says, read without loading its tensors."""

    path: Path
    architecture: str  # general.architecture, e.g. "llama"
    name: str | None  # general.name
    file_type: int | None  # general.file_type (llama.cpp's LLAMA_FTYPE_*), when recorded
    native_dtype: str  # the float type of its weights: float32 / float16 / bfloat16 (float32 when quantized)
    quantized: bool  # some tensors are block-quantized (Q4_1, Q8_0, ...)


def is_gguf(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a GGUF file (by its name and its 4-byte ``GGUF`` magic)."""
    path = Path(path).expanduser()
    if path.suffix.lower() != GGUF_SUFFIX or not path.is_file():
        return False
    with open(path, "rb") as handle:
        return handle.read(4) == b"GGUF"


def read_gguf_info(path: str | os.PathLike[str]) -> GGUFInfo:
    """The architecture, name and float type a GGUF file's header records.

    Raises:
        ModelLoadError: the ``gguf`` package is missing, or the file is not a readable GGUF file.
    """
    path = Path(path).expanduser()
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ModelLoadError(f"reading {path.name} needs the gguf package: pip install 'gguf>=0.10'") from None
    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file: say so, by name
        raise ModelLoadError(f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc})") from None

    def field(key: str) -> Any:
        found = reader.fields.get(key)
        return None if found is None else found.contents()

    architecture = field("general.architecture")
    if not architecture:
        raise ModelLoadError(f"{path} records no general.architecture; it is not a model GGUF file")
    file_type = field("general.file_type")
    tensor_types = {t.tensor_type.name for t in reader.tensors}
    quantized = not tensor_types <= set(_FLOAT_TENSOR_TYPES)
    if file_type in _FLOAT_FILE_TYPES:
        native = _FLOAT_FILE_TYPES[int(file_type)]
    elif not quantized and len(tensor_types - {"F32"}) == 1:  # norms stay F32 beside F16/BF16 weights
        native = _FLOAT_TENSOR_TYPES[next(iter(tensor_types - {"F32"}))]
    else:
        native = "float32"
    return GGUFInfo(path=path, architecture=str(architecture), name=field("general.name"),
                    file_type=None if file_type is None else int(file_type), native_dtype=native,
                    quantized=quantized)


def gguf_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of the file (memoised on path, size and modification time)."""
    from llmstack.registry._registry import hash_file

    return hash_file(Path(path).expanduser(), memo=True)


def registry_name_for(source: str | os.PathLike[str]) -> str:
    """A valid registry name for an outside model: its file stem / directory / hub repo name, with every
    character a name cannot hold replaced by ``-`` (``My Model (v2).gguf`` -> ``My-Model-v2``)."""
    from llmstack.registry._refs import MAX_NAME_LENGTH

    text = str(source).rstrip("/\\")
    path = Path(text)
    stem = path.stem if path.suffix.lower() == GGUF_SUFFIX else path.name
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", stem)
    name = re.sub(r"\.{2,}", ".", name)
    name = name.lstrip("._-").rstrip(".-")[:MAX_NAME_LENGTH].rstrip(".-")
    return name or "model"


def supported_architecture(architecture: str) -> bool:
    """Whether ``transformers`` can load a GGUF file of this (llama.cpp) architecture."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return _ARCHITECTURE_ALIASES.get(architecture, architecture) in GGUF_SUPPORTED_ARCHITECTURES


def convert_gguf(info: GGUFInfo, directory: Path, *, dtype: str) -> Path:
    """Write ``info.path`` as a safetensors Hugging Face directory, dequantized to ``dtype``.

    ``from_pretrained(gguf_file=...)`` dequantizes; the model it returns refuses ``save_pretrained``
    (it carries the GGUF quantization config), so its weights move into a plain model built from the
    same config without it.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not supported_architecture(info.architecture):
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        known = ", ".join(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer"))
        raise ModelLoadError(f"{info.path.name}: GGUF architecture {info.architecture!r} is not one transformers "
                             f"can load (it loads: {known}); convert it with llama.cpp's tools to a Hugging Face "
                             "directory instead")
    torch_dtype = getattr(torch, dtype)
    folder, file = str(info.path.parent), info.path.name
    try:
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
        config = AutoConfig.from_pretrained(folder, gguf_file=file)
    except Exception as exc:  # noqa: BLE001 - transformers' many ways to fail on a file: one message
        raise ModelLoadError(f"transformers cannot load {info.path.name} (GGUF architecture "
                             f"{info.architecture!r}): {type(exc).__name__}: {exc}") from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch_dtype
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    plain.load_state_dict(loaded.state_dict(), strict=False, assign=True)
    plain.tie_weights()
    computed = dict(loaded.named_buffers())  # non-persistent buffers (rotary frequencies) are not in a state dict
    for module_name, module in plain.named_modules():
        for buffer_name, buffer in list(module.named_buffers(recurse=False)):
            full = f"{module_name}.{buffer_name}" if module_name else buffer_name
            if buffer.is_meta and full in computed:
                module._buffers[buffer_name] = computed[full]
    missing = [n for n, p in list(plain.named_parameters()) + list(plain.named_buffers()) if p.is_meta]
    if missing:
        raise ModelLoadError(f"{info.path.name}: the dequantized weights leave {len(missing)} tensors unset "
                             f"({', '.join(missing[:4])}); this GGUF file does not fit {type(plain).__name__}")
    plain.generation_config = loaded.generation_config
    directory.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(str(directory), safe_serialization=True)
    tokenizer.save_pretrained(str(directory))
    return directory


def find_import(registry: Registry, sha256: str, dtype: str, *, name: str | None = None) -> ArtifactRef | None:
    """The newest version imported from the GGUF file with this sha256 in ``dtype`` (of ``name``, or any)."""
    from llmstack.errors import ArtifactNotFoundError, RegistryError

    try:
        manifests = registry.list(name)
    except (ArtifactNotFoundError, RegistryError):
        return None
    for manifest in reversed(manifests):
        if manifest.extra.get("gguf_sha256") == sha256 and manifest.extra.get("dtype") == dtype:
            return manifest.ref
    return None


def import_gguf(path: str | os.PathLike[str], registry: Registry, *, name: str | None = None,
                dtype: str = "auto", registered_by: str = "import") -> ArtifactRef:
    """The registry version of a GGUF file: imported now, or found by the file's sha256 when it was before.

    Args:
        path: the ``.gguf`` file.
        registry: where the version lives.
        name: registry name; None: an existing import of this file under any name, else the file's stem.
        dtype: float type of the imported weights; ``"auto"``: the file's own float type (float32 for
            block-quantized files, whose dequantized values float32 holds exactly).

    Raises:
        ModelLoadError: unreadable file, an architecture transformers cannot load (named), or a dtype
            this machine cannot compute in.
    """
    from llmstack.models.artifact import _DTYPES, AUTO_DTYPE

    info = read_gguf_info(path)
    if dtype != AUTO_DTYPE and dtype not in _DTYPES:
        raise ModelLoadError(f"dtype {dtype!r} is not one of auto, {', '.join(sorted(_DTYPES))}")
    dtype = info.native_dtype if dtype == AUTO_DTYPE else _DTYPES[dtype]
    sha256 = gguf_sha256(info.path)
    found = find_import(registry, sha256, dtype, name=name)
    if found is not None:
        return found
    with tempfile.TemporaryDirectory(prefix="llmstack-gguf-") as tmp:
        convert_gguf(info, Path(tmp), dtype=dtype)
        return registry.register(
            name or registry_name_for(info.path), tmp, kind="model", parents=[GGUF_LINEAGE_PREFIX + sha256],
            extra={"source": str(info.path.resolve()), "gguf_file": info.path.name, "gguf_sha256": sha256,
                   "gguf_architecture": info.architecture, "gguf_file_type": info.file_type,
                   "gguf_quantized": info.quantized, "dtype": dtype, "registered_by": registered_by,
                   "conversion": f"GGUF dequantized by transformers to {dtype} safetensors"})


def import_model(source: str | os.PathLike[str], *, name: str | None = None, registry: Registry | str | None = None,
                 dtype: str = "auto", registered_by: str = "import") -> ArtifactRef:
    """Register an outside model (a Hugging Face directory, a hub id, or a GGUF file) as a version of ``name``.

    A directory (or hub snapshot) is stored as it is; a GGUF file is dequantized to ``dtype`` first (see
    :func:`import_gguf`). Importing the same weights again returns the existing version: for a directory
    the newest version of ``name`` whose weight files have the same sha256, for a GGUF file the one
    imported from the same file.

    Args:
        source: a model directory, a hub id (``org/name``, when online) or a ``.gguf`` file.
        name: registry name (default: the file stem / directory name, made a valid name).
        registry: a Registry or URL (default ``$LLMSTACK_REGISTRY`` or ``~/.llmstack/registry``).
        dtype: GGUF only: the float type of the imported weights (``"auto"``: the file's own).
        registered_by: recorded in the manifest (which stage imported it).

    Returns:
        The version's ref, e.g. ``ArtifactRef("smollm2", 1)``.

    Raises:
        ModelLoadError: not a model (what was found is named), or already a registry version.

    Example:
        >>> import_model("/models/SmolLM2-135M-Instruct", name="smollm2")  # doctest: +SKIP
        ArtifactRef(name='smollm2', version=1)
    """
    from llmstack.models.adapters import weight_hashes
    from llmstack.models.artifact import describe_artifact
    from llmstack.registry import Registry, validate_name

    registry = registry if isinstance(registry, Registry) else Registry(registry)
    if name is not None:
        validate_name(name)
    if is_gguf(source):
        return import_gguf(source, registry, name=name, dtype=dtype, registered_by=registered_by)
    if Path(source).expanduser().suffix.lower() == GGUF_SUFFIX:
        raise ModelLoadError(f"{source} is not a GGUF file (missing, or no GGUF header)")
    artifact = describe_artifact(source, registry=registry)
    if artifact.ref is not None:
        raise ModelLoadError(f"{source} is already registry version {artifact.ref}; to give it another name, "
                             f"point an alias at it (llmstack registry alias {artifact.ref.name} ALIAS "
                             f"v{artifact.ref.version})")
    if artifact.kind != "model":
        raise ModelLoadError(f"{source} is a {artifact.kind}, not a model; import a model directory or a GGUF file")
    directory = artifact.directory
    if not (directory / "config.json").is_file() or not any(directory.glob("*.safetensors")):
        raise ModelLoadError(f"{source}: {directory} is not a model directory (config.json + *.safetensors)")
    name = name or registry_name_for(artifact.source if artifact.identity.startswith("hub:") else directory)
    hashes = weight_hashes(directory)
    for manifest in reversed(registry.list(name) if name in registry.names() else []):
        recorded = {rel: info["sha256"] for rel, info in manifest.files.items() if rel.endswith(".safetensors")}
        if recorded == hashes:
            return manifest.ref
    hub = artifact.identity.startswith("hub:")
    return registry.register(name, directory, kind="model", parents=[artifact.source] if hub else [],
                             extra={"source": str(source), "registered_by": registered_by})
