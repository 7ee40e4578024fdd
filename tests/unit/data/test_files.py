"""User data: every format from a local path and from memory:// (fsspec), and every bad input."""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from uuid import uuid4

import fsspec
import pytest

from llmstack.data import fingerprint_documents, load_corpus
from llmstack.errors import DataError

DOCS = ["First document.\nIt has two lines.", "Second document — with ünïcode.", "Third one."]


@pytest.fixture
def memory_root() -> Iterator[str]:
    root = f"memory://llmstack-test-{uuid4().hex}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


def _write(url: str, data: bytes) -> None:
    with fsspec.open(url, "wb") as handle:
        handle.write(data)


def _txt() -> bytes:
    return ("\n\n".join(DOCS) + "\n").replace("Third", "\n  \nThird").encode()  # extra blank lines are one break


def _jsonl() -> bytes:
    return "\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(DOCS)).encode() + b"\n\n"


def _parquet() -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.table({"id": list(range(len(DOCS))), "body": DOCS}), buffer)
    return buffer.getvalue()


@pytest.fixture(params=["local", "memory"])
def where(request: pytest.FixtureRequest, tmp_path: Path, memory_root: str) -> Callable[[str], str]:
    """A function mapping a relative name to a location in the parametrised store."""
    if request.param == "local":
        return lambda name: str(tmp_path / name)
    return lambda name: f"{memory_root}/{name}"


@pytest.mark.parametrize("name,payload,field", [("docs.txt", _txt, "text"), ("docs.jsonl", _jsonl, "text"),
                                                ("docs.parquet", _parquet, "body"),
                                                ("docs.jsonl.gz", lambda: gzip.compress(_jsonl()), "text")])
def test_formats(where: Callable[[str], str], name: str, payload: Callable[[], bytes], field: str) -> None:
    url = where(name)
    _write(url, payload())
    corpus = load_corpus(url, text_field=field)
    assert corpus.documents == DOCS
    assert corpus.fingerprint == fingerprint_documents(DOCS)
    assert corpus.name == url
    assert load_corpus(url, text_field=field, max_documents=2).documents == DOCS[:2]


def test_glob_and_directory(where: Callable[[str], str]) -> None:
    _write(where("shards/b.jsonl"), _jsonl())
    _write(where("shards/a.txt"), b"Alpha.\n\nBeta.\n")
    _write(where("shards/notes.bin"), b"\x00\x01")  # unsupported files in a directory are ignored
    assert load_corpus(where("shards/*.jsonl")).documents == DOCS
    assert load_corpus(where("shards")).documents == ["Alpha.", "Beta.", *DOCS]  # sorted by path
    assert load_corpus(where("shards/*.[jt]*")).documents == ["Alpha.", "Beta.", *DOCS]
    with pytest.raises(DataError, match="matched no files"):
        load_corpus(where("shards/*.parquet"))


def test_datasets_directory(where: Callable[[str], str]) -> None:
    import datasets

    url = where("saved")
    datasets.Dataset.from_dict({"text": DOCS, "n": [1, 2, 3]}).save_to_disk(url)
    assert load_corpus(url).documents == DOCS
    with pytest.raises(DataError, match=r"no column 'body' \(columns: text, n\)"):
        load_corpus(url, text_field="body")
    both = where("saved-dict")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": DOCS[:2]}),
                          "test": datasets.Dataset.from_dict({"text": DOCS[2:]})}).save_to_disk(both)
    assert load_corpus(both).documents == DOCS[:2]


# --------------------------------------------------------------------------- bad input


def test_missing_file(where: Callable[[str], str]) -> None:
    url = where("nope.jsonl")
    with pytest.raises(DataError, match="no such file or directory") as info:
        load_corpus(url)
    assert url in str(info.value)


@pytest.mark.parametrize("name,data", [("empty.txt", b""), ("blank.txt", b"  \n\n \n"), ("empty.jsonl", b""),
                                       ("blank-rows.jsonl", b'{"text": "  "}\n{"text": null}\n')])
def test_empty_files(where: Callable[[str], str], name: str, data: bytes) -> None:
    url = where(name)
    _write(url, data)
    with pytest.raises(DataError, match="empty|no non-blank documents") as info:
        load_corpus(url)
    assert url in str(info.value)


def test_non_utf8_names_file_offset_and_line(where: Callable[[str], str]) -> None:
    url = where("latin1.txt")
    data = b"line one\nline two\ncaf\xe9 au lait\n"
    _write(url, data)
    with pytest.raises(DataError) as info:
        load_corpus(url)
    message = str(info.value)
    assert url in message and "not valid UTF-8" in message
    offset = len("line one\nline two\ncaf")
    assert f"byte offset {offset}" in message and "(line 3)" in message and "0xe9" in message


def test_jsonl_bad_json_names_line(where: Callable[[str], str]) -> None:
    url = where("bad.jsonl")
    _write(url, b'{"text": "ok"}\n\n{"text": "broken"\n')
    with pytest.raises(DataError) as info:
        load_corpus(url)
    assert f"{url}:3" in str(info.value) and "not valid JSON" in str(info.value)


def test_jsonl_missing_field_names_line_and_fields(where: Callable[[str], str]) -> None:
    url = where("fields.jsonl")
    _write(url, b'{"text": "ok"}\n{"body": "x", "id": 2}\n')
    with pytest.raises(DataError) as info:
        load_corpus(url)
    message = str(info.value)
    assert f"{url}:2" in message and "no 'text' field" in message and "fields: body, id" in message


def test_jsonl_wrong_types(where: Callable[[str], str]) -> None:
    url = where("types.jsonl")
    _write(url, b'{"text": "ok"}\n[1, 2]\n')
    with pytest.raises(DataError, match=r":2: line 2 is a JSON list, expected an object"):
        load_corpus(url)
    _write(url, b'{"text": 5}\n')
    with pytest.raises(DataError, match=r":1: field 'text' on line 1 is a int, expected a string"):
        load_corpus(url)


def test_parquet_problems(where: Callable[[str], str]) -> None:
    url = where("docs.parquet")
    _write(url, _parquet())
    with pytest.raises(DataError, match=r"no column 'text' \(columns: id, body\)"):
        load_corpus(url)
    bad = where("corrupt.parquet")
    _write(bad, b"PAR1 this is not parquet")
    with pytest.raises(DataError, match="not a readable parquet file"):
        load_corpus(bad)


def test_unsupported_suffix_and_bad_arguments(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("a,b\n")
    with pytest.raises(DataError, match=r"unsupported file type; expected \.txt"):
        load_corpus(str(path))
    with pytest.raises(DataError, match="non-empty string"):
        load_corpus("")
    with pytest.raises(DataError, match="max_documents must be >= 1"):
        load_corpus("builtin:stdlib", max_documents=0)


def test_s3_with_storage_options(s3_server: dict) -> None:
    """A real S3-protocol server on loopback: the URL and storage_options reach s3fs."""
    options = s3_server["storage_options"]
    base = f"s3://{s3_server['bucket']}/data-{uuid4().hex}"
    fs = fsspec.filesystem("s3", **options)
    fs.pipe(f"{base}/part-0.jsonl", _jsonl())
    fs.pipe(f"{base}/part-1.txt", b"Alpha.\n\nBeta.\n")
    assert load_corpus(f"{base}/part-0.jsonl", storage_options=options).documents == DOCS
    assert load_corpus(f"{base}/part-*", storage_options=options).documents == [*DOCS, "Alpha.", "Beta."]
    with pytest.raises(DataError, match="no such file or directory"):
        load_corpus(f"{base}/missing.jsonl", storage_options=options)
