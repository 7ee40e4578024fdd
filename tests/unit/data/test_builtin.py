"""Built-in corpora: deterministic, fingerprinted, cached, and sensible content."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmstack.data import BUILTINS, fingerprint_documents, load_corpus, load_instructions
from llmstack.data import builtin
from llmstack.errors import DataError


def test_stdlib_corpus_is_substantial_and_normalised(stdlib_corpus) -> None:
    docs = stdlib_corpus.documents
    assert len(docs) > 200
    assert 500_000 < stdlib_corpus.num_chars < 20_000_000
    assert all(doc.startswith("Module ") for doc in docs)
    json_doc = next(doc for doc in docs if doc.startswith("Module json\n"))
    assert "json.dumps(obj, *, skipkeys=False" in json_doc
    for doc in docs:
        assert "\t" not in doc and "\n\n\n" not in doc and doc == doc.strip()
        assert not any(line != line.rstrip() for line in doc.split("\n"))
    # tests, idlelib and lib2to3 are skipped; private helper modules are kept as text
    names = {doc.split("\n", 1)[0].removeprefix("Module ") for doc in docs}
    assert not any(n.startswith(("test.", "idlelib", "lib2to3")) or n == "test" for n in names)
    assert "json.decoder" in names and "collections" in names


def test_stdlib_corpus_is_deterministic_and_cached(stdlib_corpus, data_cache: Path) -> None:
    again = load_corpus("builtin:stdlib")
    assert again.documents == stdlib_corpus.documents
    assert again.fingerprint == stdlib_corpus.fingerprint and len(again.fingerprint) == 64
    cached = sorted((data_cache / "corpora").glob(f"stdlib-{builtin.python_version()}-*.jsonl"))
    assert len(cached) == 1
    assert [json.loads(line) for line in cached[0].read_text().splitlines()] == stdlib_corpus.documents


def test_damaged_cache_is_rebuilt(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LLMSTACK_CACHE", str(tmp_path))
    few_files = builtin._module_files(builtin.stdlib_dir())[:25]  # a small stdlib keeps the rebuild quick
    monkeypatch.setattr(builtin, "_module_files", lambda root: few_files)
    fresh = load_corpus("builtin:stdlib")
    assert fresh.documents == builtin.build_stdlib_documents(few_files)
    (path,) = (tmp_path / "corpora").glob(f"stdlib-{builtin.python_version()}-*.jsonl")
    path.write_text('"truncated\n')
    assert load_corpus("builtin:stdlib").fingerprint == fresh.fingerprint
    assert path.read_text().startswith('"Module ')  # rewritten whole
    assert not list((tmp_path / "corpora").glob(".*tmp"))  # no temp files left behind


def test_build_is_stable_across_processes() -> None:
    """A fresh interpreter with another hash seed builds identical documents and QA rows.

    A slice of the stdlib keeps this quick; any hash-order dependence would show on it too.
    """
    code = ("import json; from llmstack.data import builtin as b, fingerprint_documents as f\n"
            "built = b._build_all(b._module_files(b.stdlib_dir())[:120])\n"
            "print(f(built['stdlib']), f(json.dumps(r, sort_keys=True) for r in built['stdlib-qa']))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         check=True)
    built = builtin._build_all(builtin._module_files(builtin.stdlib_dir())[:120])
    assert len(built["stdlib"]) > 50 and len(built["stdlib-qa"]) > 500
    expected = (fingerprint_documents(built["stdlib"]),
                fingerprint_documents(json.dumps(r, sort_keys=True) for r in built["stdlib-qa"]))
    assert tuple(out.stdout.split()) == expected


def test_max_documents_takes_a_prefix(stdlib_corpus) -> None:
    few = load_corpus("builtin:stdlib", max_documents=7)
    assert few.documents == stdlib_corpus.documents[:7]
    assert few.fingerprint != stdlib_corpus.fingerprint
    assert load_corpus("builtin:stdlib", max_documents=7).fingerprint == few.fingerprint


def test_unknown_builtin_lists_known_ones() -> None:
    with pytest.raises(DataError) as info:
        load_corpus("builtin:shakespeare")
    message = str(info.value)
    assert "builtin:shakespeare" in message
    for name in BUILTINS:
        assert name in message


def test_stdlib_qa_pairs_and_split() -> None:
    train = load_instructions("builtin:stdlib-qa")
    held_out = load_instructions("builtin:stdlib-qa", split="eval")
    everything = load_instructions("builtin:stdlib-qa", split="all")
    assert len(train) + len(held_out) == len(everything) > 3000
    assert 0.02 < len(held_out) / len(everything) < 0.10
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held_out}
    assert load_instructions("builtin:stdlib-qa", split="eval") == held_out  # deterministic
    rows = {r["prompt"]: r["response"] for r in everything}
    assert rows["What does the function `json.dumps` do?"].startswith("Serialize ``obj`` to a JSON formatted ``str``")
    signature = rows["What arguments does `json.dumps` take?"]
    assert signature.startswith("The signature is `json.dumps(obj, *, skipkeys=False")
    assert "What is the `json` module for?" in rows
    # both questions about one object share a split
    for prompt in ("What does the function `json.dumps` do?", "What arguments does `json.dumps` take?"):
        assert (prompt in {r["prompt"] for r in held_out}) == (builtin.qa_split("json.dumps") == "eval")


def test_stdlib_qa_as_text_corpus_is_the_train_split() -> None:
    corpus = load_corpus("builtin:stdlib-qa", max_documents=5)
    train = load_instructions("builtin:stdlib-qa", max_rows=5)
    assert corpus.documents == [f"Question: {r['prompt']}\nAnswer: {r['response']}" for r in train]


def test_summary_extraction() -> None:
    assert builtin.summary("Return the sum.  Extra detail here. And more.\n\nLong part.") == \
        "Return the sum. Extra detail here."
    assert builtin.summary("f(x) -> int\n\nCompute things for x.") == "Compute things for x."
    assert builtin.summary("   \n") is None
