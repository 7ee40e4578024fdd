"""Text corpora: the built-in offline ones and user files from a local path or any fsspec URL.

Supported sources (``load_corpus(source)``):

* ``builtin:stdlib`` — stdlib docstrings, one document per module (see :mod:`llmstack.data.builtin`).
* ``builtin:stdlib-qa`` — the *train* split of the built-in QA pairs, each rendered as
  ``"Question: ...\\nAnswer: ..."`` (the eval split stays unseen).
* ``.txt`` / ``.md`` / ``.text`` files — **one document per blank-line-separated paragraph**
  (a blank line is one or more empty or whitespace-only lines), so one big text file still gives
  many documents and ``max_documents`` stays meaningful. Lines within a paragraph keep their breaks.
* ``.jsonl`` — one JSON object per line; the document is ``row[text_field]``.
* ``.parquet`` — the ``text_field`` column.
* a directory written by ``datasets.Dataset.save_to_disk`` (the ``train`` split of a DatasetDict).
* a plain directory or a glob pattern (``data/*.jsonl``, ``s3://bucket/shards/*.parquet``): every
  supported file it matches, in sorted order. A ``.gz``/``.bz2``/``.xz``/``.zst`` suffix is decompressed.

Empty and whitespace-only documents are dropped; a source that yields none is an error.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from llmstack.errors import DataError

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
COMPRESSION_SUFFIXES = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zst": "zstd"}
BUILTINS = ("builtin:stdlib", "builtin:stdlib-qa")

_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n\s*")


@dataclass
class Corpus:
    """Documents plus a fingerprint (sha256 over the documents, in order).

    Attributes:
        name: the source it was loaded from (``builtin:stdlib``, a path or URL).
        documents: the text documents, in source order.
        fingerprint: ``sha256`` hex digest over the documents; equal documents, equal fingerprint.
    """

    name: str
    documents: list[str]
    fingerprint: str

    def __len__(self) -> int:
        return len(self.documents)

    @property
    def num_chars(self) -> int:
        return sum(len(doc) for doc in self.documents)

    @classmethod
    def from_documents(cls, name: str, documents: Iterable[str]) -> Corpus:
        docs = list(documents)
        return cls(name=name, documents=docs, fingerprint=fingerprint_documents(docs))


def fingerprint_documents(documents: Iterable[str]) -> str:
    """sha256 over the documents; each is length-prefixed so boundaries count."""
    digest = hashlib.sha256(b"llmstack-corpus-v1\n")
    for doc in documents:
        data = doc.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def load_corpus(source: str, *, text_field: str = "text", max_documents: int | None = None,
                storage_options: dict[str, Any] | None = None) -> Corpus:
    """Load a text corpus from a builtin name, a local path, a glob or an fsspec URL.

    Args:
        source: ``builtin:stdlib``, ``builtin:stdlib-qa``, or a path/URL/glob of ``.txt``, ``.jsonl``,
            ``.parquet`` files or a ``datasets.save_to_disk`` directory.
        text_field: column or key holding the text in jsonl, parquet and datasets sources.
        max_documents: keep only the first N documents (None: all).
        storage_options: fsspec options for remote URLs, e.g. ``{"endpoint_url": ..., "key": ...}``.

    Returns:
        A :class:`Corpus` whose fingerprint covers exactly the documents returned.

    Raises:
        DataError: unknown builtin, missing or empty file, non-UTF-8 text, malformed jsonl row or
            missing field (the message names the file and line).

    Example:
        >>> corpus = load_corpus("builtin:stdlib", max_documents=10)
        >>> len(corpus.documents)
        10
    """
    if not isinstance(source, str) or not source.strip():
        raise DataError(f"data source must be a non-empty string, got {source!r}")
    if max_documents is not None and (isinstance(max_documents, bool) or max_documents < 1):
        raise DataError(f"max_documents must be >= 1 or None, got {max_documents!r}")
    if source.startswith("builtin:"):
        documents = _builtin_documents(source)
    else:
        documents = _read_source(source, text_field=text_field, storage_options=storage_options or {},
                                 limit=max_documents)
    if max_documents is not None:
        documents = documents[:max_documents]
    if not documents:
        raise DataError(f"{source}: the corpus is empty (no non-blank documents)")
    return Corpus.from_documents(source, documents)


def _builtin_documents(source: str) -> list[str]:
    from llmstack.data import builtin

    if source == "builtin:stdlib":
        return builtin.stdlib_documents()
    if source == "builtin:stdlib-qa":
        return [f"Question: {r['prompt']}\nAnswer: {r['response']}" for r in builtin.stdlib_qa_rows("train")]
    raise DataError(f"unknown builtin corpus {source!r}; known: {', '.join(BUILTINS)}")


# --------------------------------------------------------------------------- file sources


def _kind(path: str) -> tuple[str | None, str | None]:
    """``(format, compression)`` from a file name, format one of text/jsonl/parquet or None."""
    lower = path.lower()
    compression = None
    for suffix, codec in COMPRESSION_SUFFIXES.items():
        if lower.endswith(suffix):
            lower, compression = lower[: -len(suffix)], codec
            break
    if lower.endswith(TEXT_SUFFIXES):
        return "text", compression
    if lower.endswith(JSONL_SUFFIXES):
        return "jsonl", compression
    if lower.endswith(PARQUET_SUFFIXES):
        return "parquet", compression
    return None, compression


def _supported() -> str:
    return ", ".join(TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES) + " files or a datasets.save_to_disk directory"


def open_filesystem(source: str, storage_options: dict[str, Any]) -> tuple[Any, str]:
    """``(fsspec filesystem, path)`` for a local path or URL; DataError when the protocol is unusable."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(source, **storage_options)
    except (ImportError, ValueError) as exc:
        raise DataError(f"cannot open {source!r}: {exc}") from None


def _has_magic(path: str) -> bool:
    return any(ch in path for ch in "*?[")


def resolve_files(source: str, storage_options: dict[str, Any]) -> tuple[Any, list[str], bool]:
    """Expand ``source`` to ``(fs, sorted file paths, is_datasets_dir)``; DataError if nothing is there."""
    fs, path = open_filesystem(source, storage_options)
    try:
        if _has_magic(path):
            matches = sorted(p for p in fs.glob(path) if fs.isfile(p))
            if not matches:
                raise DataError(f"{source}: the pattern matched no files")
            return fs, matches, False
        if fs.isdir(path):
            if fs.exists(f"{path.rstrip('/')}/dataset_info.json") or fs.exists(f"{path.rstrip('/')}/dataset_dict.json"):
                return fs, [path], True
            files = sorted(p for p in fs.find(path) if _kind(p)[0] is not None)
            if not files:
                raise DataError(f"{source}: the directory holds no supported files (expected {_supported()})")
            return fs, files, False
        if not fs.exists(path):
            raise DataError(f"{source}: no such file or directory")
    except DataError:
        raise
    except (OSError, ValueError) as exc:  # permission denied, bad credentials, unreachable endpoint
        raise DataError(f"cannot read {source}: {type(exc).__name__}: {exc}") from None
    return fs, [path], False


def _read_source(source: str, *, text_field: str, storage_options: dict[str, Any],
                 limit: int | None) -> list[str]:
    fs, paths, is_dataset = resolve_files(source, storage_options)
    if is_dataset:
        return _read_datasets_dir(source, text_field=text_field, storage_options=storage_options)
    documents: list[str] = []
    for path in paths:
        name = source if paths == [fs._strip_protocol(source)] else _display(fs, path)
        fmt, compression = _kind(path)
        if fmt is None:
            raise DataError(f"{name}: unsupported file type; expected {_supported()}")
        if fmt == "parquet":
            docs = _read_parquet(fs, path, name, text_field=text_field)
        else:
            data = _read_bytes(fs, path, name, compression)
            text = decode_utf8(data, name)
            if not text.strip():
                raise DataError(f"{name}: the file is empty")
            docs = _split_paragraphs(text) if fmt == "text" else _read_jsonl_text(text, name, text_field)
        if not docs:
            raise DataError(f"{name}: the file holds no non-blank documents")
        documents.extend(docs)
        if limit is not None and len(documents) >= limit:
            break
    return documents


def _display(fs: Any, path: str) -> str:
    """A file name as the user would write it: plain for local files, a URL otherwise."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    if "file" in protocols or "local" in protocols:
        return path
    try:
        return fs.unstrip_protocol(path)
    except Exception:
        return path


def _read_bytes(fs: Any, path: str, name: str, compression: str | None) -> bytes:
    try:
        with fs.open(path, "rb", compression=compression) as handle:
            return handle.read()
    except FileNotFoundError:
        raise DataError(f"{name}: no such file") from None
    except (OSError, EOFError, ValueError) as exc:
        raise DataError(f"cannot read {name}: {type(exc).__name__}: {exc}") from None


def decode_utf8(data: bytes, name: str) -> str:
    """Decode strictly; a bad byte gives a DataError naming the file, byte offset and line."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{name}: not valid UTF-8 at byte offset {exc.start} (line {line}): {exc.reason} "
                        f"(byte 0x{data[exc.start]:02x}); re-encode the file as UTF-8") from None
    return text.removeprefix("\ufeff")


def _split_paragraphs(text: str) -> list[str]:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return [p.strip() for p in _PARAGRAPH_BREAK.split(text) if p.strip()]


def iter_jsonl(text: str, name: str) -> Iterable[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for each non-blank line; DataError names file and line when it is not an object."""
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{name}:{number}: line {number} is not valid JSON ({exc.msg} at column {exc.colno})") \
                from None
        if not isinstance(row, dict):
            raise DataError(f"{name}:{number}: line {number} is a JSON {type(row).__name__}, expected an object")
        yield number, row


def _read_jsonl_text(text: str, name: str, text_field: str) -> list[str]:
    documents: list[str] = []
    for number, row in iter_jsonl(text, name):
        if text_field not in row:
            fields = ", ".join(sorted(row)) or "none"
            raise DataError(f"{name}:{number}: line {number} has no {text_field!r} field "
                            f"(fields: {fields}); set data.text_field to the key holding the text")
        value = row[text_field]
        if value is None:
            continue
        if not isinstance(value, str):
            raise DataError(f"{name}:{number}: field {text_field!r} on line {number} is a "
                            f"{type(value).__name__}, expected a string")
        if value.strip():
            documents.append(value)
    return documents


def _text_column(values: Sequence[Any], name: str, text_field: str, row_word: str = "row") -> list[str]:
    documents: list[str] = []
    for index, value in enumerate(values):
        if value is None:
            continue
        if not isinstance(value, str):
            raise DataError(f"{name}: {row_word} {index} of column {text_field!r} is a {type(value).__name__}, "
                            "expected a string")
        if value.strip():
            documents.append(value)
    return documents


def _read_parquet(fs: Any, path: str, name: str, *, text_field: str) -> list[str]:
    import pyarrow.parquet as pq

    try:
        with fs.open(path, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            columns = parquet.schema_arrow.names
            if text_field not in columns:
                raise DataError(f"{name}: no column {text_field!r} (columns: {', '.join(columns) or 'none'}); "
                                "set data.text_field to the column holding the text")
            values = parquet.read(columns=[text_field]).column(text_field).to_pylist()
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{name}: no such file") from None
    except Exception as exc:  # pyarrow raises its own ArrowInvalid family for corrupt files
        raise DataError(f"{name}: not a readable parquet file ({type(exc).__name__}: {exc})") from None
    if not values:
        raise DataError(f"{name}: the file is empty (0 rows)")
    return _text_column(values, name, text_field)


def load_saved_dataset(source: str, *, storage_options: dict[str, Any] | None = None) -> Any:
    """A ``datasets.save_to_disk`` directory as one ``Dataset`` (the ``train`` split of a DatasetDict)."""
    import datasets

    try:
        loaded = datasets.load_from_disk(source, storage_options=storage_options or None)
    except Exception as exc:
        raise DataError(f"{source}: cannot load the saved dataset ({type(exc).__name__}: {exc})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise DataError(f"{source}: a DatasetDict without a 'train' split (splits: {', '.join(loaded)})")
        loaded = loaded["train"]
    return loaded


def _read_datasets_dir(source: str, *, text_field: str, storage_options: dict[str, Any]) -> list[str]:
    loaded = load_saved_dataset(source, storage_options=storage_options)
    if text_field not in loaded.column_names:
        raise DataError(f"{source}: no column {text_field!r} (columns: {', '.join(loaded.column_names)}); "
                        "set data.text_field to the column holding the text")
    if len(loaded) == 0:
        raise DataError(f"{source}: the dataset is empty (0 rows)")
    return _text_column(loaded[text_field], source, text_field)
