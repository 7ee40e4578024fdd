"""``quantize()``: check everything, quantize, evaluate against the source, register a new version."""

from __future__ import annotations

import dataclasses
import json
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmstack._verbs import Overrides, open_registry, read_settings
from llmstack.config import QuantizeConfig, to_dict
from llmstack.errors import ConfigError, DataError, ResourceError
from llmstack.quantize._base import LLMSTACK_FORMAT, Recipe, meta_skeleton
from llmstack.quantize._dispatch import get_backend
from llmstack.quantize._io import is_quantized_dir
from llmstack.quantize._result import QuantizeResult

if TYPE_CHECKING:
    from llmstack.registry import ArtifactRef, Registry

DEFAULT_DATA = "builtin:stdlib"


def quantize(config: QuantizeConfig | Mapping[str, Any] | str | Path | None = None, *,
             source: str | ArtifactRef | Path | None = None, name: str | None = None, calibration: Any = None,
             registry: Registry | str | None = None, overrides: Overrides = (), **settings: Any) -> QuantizeResult:
    """Quantize a model (a registry version, a directory or a GGUF file) and register the result as a new
    ``quantized`` version.

    Every check runs before any weights are touched: the method exists, the source is not already
    quantized, the method's kernel runs on this hardware, the architecture has the layers the
    method needs, and the calibration set is not empty. Then the float source and the quantized
    model are evaluated side by side (held-out perplexity, bytes, prefill/decode tokens/s) and the
    quantized weights are registered as safetensors with the recipe (``quantization.json``).

    Args:
        config: a :class:`~llmstack.config.QuantizeConfig`, a mapping of its fields, or a YAML file path (None:
            defaults). A mapping or file may also hold ``source`` and ``name``.
        source: the model: a registry reference (``name@vN``, ``name@alias``, ``name``), a local model
            directory or a ``.gguf`` file (imported into the registry once).
        name: registry name of the result (default ``<source name>-<method>``).
        calibration: calibration data for methods that calibrate (``smoothquant``): a data source
            string, a list of texts, a ``Corpus`` or a LongTensor of token blocks ``[n, T]``.
            None: ``config.calibration.data``, else the train split of the source's training corpus
            (``builtin:stdlib`` when unknown); perplexity is measured on the held-out split.
        registry: where the source lives and the result goes: a Registry or URL (None: the default registry).
        overrides: ``key.path=value`` strings (or a mapping of key paths to values) applied on top of ``config``;
            ``source=...`` and ``name=...`` are accepted here too (the CLI's form).
        **settings: top-level config keys as values, applied last, e.g. ``method="nf4"`` (``int8-weight-only``
            (default) | ``int8-dynamic`` | ``int4-weight-only`` (torchao) | ``int8`` (LLM.int8) | ``nf4`` |
            ``fp4`` | ``smoothquant`` | ``w8a8``; ``dynamic-int8``, the old torch.ao method, runs as
            ``int8-dynamic``) or ``evaluate=False``.

    Returns:
        :class:`QuantizeResult` with the new reference, the metrics and ``table()``.

    Raises:
        ConfigError: unknown method (the known ones are listed), bad config, already-quantized
            source, or an architecture without the layers the method needs.
        ResourceError: the method's kernel cannot run on this hardware (says why).
        DataError: empty or unusable calibration data.
        ArtifactNotFoundError, ModelLoadError: the source cannot be found or loaded.

    Example:
        >>> import llmstack
        >>> result = llmstack.quantize(source="tiny-lm@v1", method="smoothquant", search_alpha=True)  # doctest: +SKIP
        >>> print(result.table())  # doctest: +SKIP
        >>> result.ref  # doctest: +SKIP
        ArtifactRef(name='tiny-lm-smoothquant', version=1)
    """
    from tqdm.auto import tqdm

    from llmstack.models.artifact import describe_artifact, load_artifact, stored_dtype
    from llmstack.models.loading import load_tokenizer

    cfg, given = read_settings("quantize", QuantizeConfig, config, overrides, settings,
                               inputs={"source": source, "name": name})
    ref, name = given["source"], given["name"]
    if ref is None:
        raise ConfigError("source: no model given; set source (quantize(source=...), `llmstack quantize MODEL` or "
                          "source: in the config): a registry ref such as tiny-lm@v1, a model directory or a .gguf file")
    if cfg.method == "dynamic-int8":
        warnings.warn("quantize method 'dynamic-int8' (torch.ao.quantization, deprecated by PyTorch) now runs as "
                      "'int8-dynamic' on torchao; use 'int8-weight-only' (the default) for the most accurate int8",
                      FutureWarning, stacklevel=2)
    backend = get_backend(cfg.method)
    registry = open_registry(registry)
    artifact = describe_artifact(ref, registry=registry)  # resolved once: every step below uses this version
    source_dir, source_ref = artifact.directory, artifact.ref
    source = str(source_ref) if source_ref is not None else str(ref)
    if cfg.dtype is None:  # non-quantized parts and compute stay in the dtype the source is stored in
        cfg = dataclasses.replace(cfg, dtype=stored_dtype(source_dir))
    manifest = registry.manifest(source_ref) if source_ref is not None else None

    # ---- checks, all before any work
    if artifact.kind == "quantized" or is_quantized_dir(source_dir):
        parent = (manifest.parents[0] if manifest is not None and manifest.parents else None)
        hint = f"; quantize its float parent {parent} instead" if parent else ""
        raise ConfigError(f"source {source} is already quantized{hint}")
    if artifact.kind != "model":
        raise ConfigError(f"source {source} is a {artifact.kind!r} artifact; quantize() needs a model")
    problem = backend.hardware_problem(cfg.method, cfg)
    if problem:
        raise ResourceError(f"method {cfg.method} cannot run on this machine: {problem}")
    problems = backend.architecture_problems(meta_skeleton(source_dir), cfg.method)
    if problems:
        raise ConfigError([f"method {cfg.method}: {p}" for p in problems], source=source)
    tokenizer = load_tokenizer(artifact)
    data = _DataPlan(cfg, manifest, tokenizer, _max_positions(source_dir))
    calib_blocks = calib_fp = None
    if calibration is not None or cfg.method in backend.needs_calibration:
        calib_blocks, calib_fp = data.calibration(calibration)
    eval_blocks = data.eval_blocks() if cfg.evaluation.enabled else None
    if name is None:
        name = f"{source_ref.name if source_ref is not None else Path(source_dir).name}-{cfg.method}"

    # ---- work
    stages = ["load source", "evaluate source", f"quantize ({cfg.method})", "evaluate quantized", "register"]
    with tqdm(total=len(stages), desc="quantize", unit="stage", leave=False) as bar:
        def step(i: int) -> None:
            bar.set_description(f"quantize: {stages[i]}")

        def progress(message: str) -> None:
            bar.set_postfix_str(message[:60])

        step(0)
        model = load_artifact(artifact, dtype=cfg.dtype, with_tokenizer=False).model
        from llmstack.quantize._int8 import decoder_linear_names

        layer_names = decoder_linear_names(model)
        vocab = int(model.config.vocab_size)
        bar.update()
        step(1)
        source_metrics: dict[str, float] = {}
        if cfg.evaluation.enabled:
            source_metrics = _evaluate(model, eval_blocks, cfg, vocab, layer_names)
        bar.update()
        step(2)
        quantized, details = backend.quantize(model, method=cfg.method, source_dir=source_dir, config=cfg,
                                              calibration=calib_blocks, progress=progress)
        _cast_float_parameters(quantized, cfg.dtype)
        # Save before the first inference forward: bitsandbytes 0.50 repacks 4-bit weights for its
        # fused CPU kernel on that forward, and saving after the repack is lossy (bf16 absmax).
        tmp = tempfile.TemporaryDirectory(prefix="llmstack-quant-")
        out = Path(tmp.name)
        backend.save(quantized, out)
        tokenizer.save_pretrained(str(out))
        bar.update()
        step(3)
        metrics: dict[str, float] = {}
        if cfg.evaluation.enabled:
            from llmstack.quantize._evaluate import with_ratios

            metrics = with_ratios(_evaluate(quantized, eval_blocks, cfg, vocab, layer_names), source_metrics)
        bar.update()
        step(4)
        recipe = Recipe(method=cfg.method, format=getattr(backend, "format", LLMSTACK_FORMAT), source=source, dtype=cfg.dtype,
                        config=to_dict(cfg), details=details)
        if cfg.evaluation.enabled:
            recipe.details["evaluation"] = {"eval_data": data.eval_source, "eval_blocks": list(eval_blocks.shape),
                                            "calibration_blocks": (list(calib_blocks.shape)
                                                                   if calib_blocks is not None else None)}
        lineage = _lineage(artifact, source)
        with tmp:
            recipe.write(out)
            metrics["file_bytes"] = sum(p.stat().st_size for p in out.glob("*.safetensors"))
            new_ref = registry.register(
                name, out, kind="quantized", parents=lineage.pop("parents"),
                config=to_dict(cfg), metrics=_finite(metrics), data_fingerprint=calib_fp,
                extra={"quantization": _jsonable(recipe.to_dict()), "source": source, **lineage})
        bar.update()
    return QuantizeResult(ref=new_ref, source=source, method=cfg.method, metrics=metrics,
                          recipe=recipe.to_dict(), config=to_dict(cfg))


# ----------------------------------------------------------------------------- helpers


def _lineage(artifact: Any, source: str) -> dict[str, Any]:
    """The result's parents: the registry version quantized, or the outside source (a directory, a file) by
    its path plus the sha256 of its files' contents, so a quantized outside model stays traceable."""
    if artifact.ref is not None:
        return {"parents": [artifact.ref]}
    from llmstack.models.artifact import directory_identity

    where = str(Path(artifact.directory).resolve())
    return {"parents": [where], "source_identity": directory_identity(Path(artifact.directory), content=True)}


def _max_positions(directory: Path) -> int | None:
    try:
        return int(json.loads((directory / "config.json").read_text())["max_position_embeddings"])
    except (OSError, KeyError, ValueError, TypeError):
        return None


class _DataPlan:
    """Where calibration and evaluation blocks come from, resolved before any model work.

    When the source's manifest records its training data (``config.data``), the held-out blocks
    are exactly that run's eval split (same corpus, block size, eval fraction and seed), so
    perplexity is measured on text the model never trained on; calibration samples come from the
    train split, never from the evaluation blocks.
    """

    def __init__(self, cfg: QuantizeConfig, manifest: Any, tokenizer: Any, max_positions: int | None) -> None:
        self.cfg, self.tokenizer = cfg, tokenizer
        trained = (manifest.config or {}).get("data", {}) if manifest is not None else {}
        trained = trained if isinstance(trained, Mapping) else {}
        self.trained_source = trained.get("source") if isinstance(trained.get("source"), str) else None
        self.eval_source = cfg.evaluation.data or self.trained_source or DEFAULT_DATA
        same = self.eval_source == self.trained_source and cfg.evaluation.data is None
        self.block_size = int(trained.get("block_size", cfg.seq_len)) if same else cfg.seq_len
        if max_positions:
            self.block_size = min(self.block_size, max_positions)
        self.eval_fraction = float(trained.get("eval_fraction", 0.05)) if same else 0.05
        self.seed = int(trained.get("seed", 0)) if same else 0
        self.max_documents = trained.get("max_documents") if same else None
        self._packed: dict[str, Any] = {}

    def _pack(self, source: str) -> Any:
        if source not in self._packed:
            from llmstack.data import load_corpus, pack_corpus

            corpus = load_corpus(source, max_documents=self.max_documents if source == self.eval_source else None)
            if not corpus.documents:
                raise DataError(f"empty calibration/evaluation set: {source} holds no documents")
            self._packed[source] = pack_corpus(corpus, self.tokenizer, block_size=self.block_size,
                                               eval_fraction=self.eval_fraction, seed=self.seed)
        return self._packed[source]

    def eval_blocks(self) -> Any:
        return self._pack(self.eval_source).eval[: self.cfg.evaluation.samples]

    def calibration(self, calibration: Any) -> tuple[Any, str]:
        """``(LongTensor [n, T], fingerprint)`` of calibration blocks; DataError when empty."""
        import hashlib

        import torch

        n = self.cfg.calibration.samples
        if calibration is None or isinstance(calibration, str):
            source = calibration if isinstance(calibration, str) else (self.cfg.calibration.data or self.eval_source)
            if isinstance(calibration, str) and not calibration.strip():
                raise DataError("empty calibration set: the calibration source is an empty string")
            packed = self._pack(source)
            train = packed.train
            if train.shape[0] == 0:
                raise DataError(f"empty calibration set: {source} gives no train blocks of {self.block_size} tokens")
            order = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(0))[:n]
            blocks = train[order.sort().values]
            return blocks, packed.fingerprint
        if isinstance(calibration, torch.Tensor):
            blocks = calibration if calibration.dim() == 2 else calibration.reshape(1, -1)
            if blocks.numel() == 0:
                raise DataError(f"empty calibration set: token tensor of shape {tuple(calibration.shape)}")
            blocks = blocks[:n].long()
        else:
            documents = getattr(calibration, "documents", calibration)
            if isinstance(documents, (str, bytes)) or not isinstance(documents, Sequence):
                raise DataError(f"calibration: expected a data source string, a list of texts, a Corpus or a "
                                f"LongTensor of token ids, got {type(calibration).__name__}")
            texts = [d for d in documents if isinstance(d, str) and d.strip()]
            if not texts:
                raise DataError(f"empty calibration set: {len(documents)} document(s), none with text")
            blocks = self._chunk(texts)[:n]
        digest = hashlib.sha256(blocks.numpy().tobytes()).hexdigest()
        return blocks, digest

    def _chunk(self, texts: list[str]) -> Any:
        import torch

        from llmstack.data.packing import encode_documents

        if self.tokenizer.eos_token_id is None:
            raise DataError("calibration: the tokenizer has no eos token to join the texts with; give token "
                            "blocks (a LongTensor) instead")
        # Each text as the tokenizer encodes it (with its BOS where it adds one), EOS-joined: as in pretraining.
        stream = [t for ids in encode_documents(texts, self.tokenizer) for t in ids]
        if not stream:
            raise DataError("empty calibration set: the texts tokenize to nothing")
        size = min(self.block_size, len(stream))
        n_blocks = len(stream) // size
        return torch.tensor(stream[: n_blocks * size], dtype=torch.long).view(n_blocks, size)


def _evaluate(model: Any, eval_blocks: Any, cfg: QuantizeConfig, vocab: int, layer_names: list[str]) -> dict:
    from llmstack.quantize._evaluate import evaluate

    return evaluate(model, eval_blocks=eval_blocks, config=cfg, vocab_size=vocab, layer_names=layer_names)


def _torch_dtype(name: str) -> Any:
    import torch

    return getattr(torch, name)


def _cast_float_parameters(model: Any, dtype: str) -> None:
    """Cast float *parameters* (norms, embeddings, lm_head) to ``dtype``; int8 buffers and their
    float32 scales stay as they are (``model.to(dtype)`` would also round the scales)."""
    import torch

    from llmstack.quantize.torchao_backend import is_torchao_tensor

    target = _torch_dtype(dtype)
    for param in model.parameters():
        if is_torchao_tensor(param.data) or getattr(param, "_llmstack_compute_dtype", None):
            continue
        if param.dtype in (torch.float32, torch.bfloat16, torch.float16) and param.dtype != target:
            param.data = param.data.to(target)
    model.config.dtype = dtype


def _finite(metrics: dict[str, float]) -> dict[str, float]:
    import math

    return {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in metrics.items()}


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))
