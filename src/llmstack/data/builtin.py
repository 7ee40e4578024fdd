"""Built-in offline corpora, derived from the standard library of the running Python.

Two builtins exist, both built from the stdlib *source* with :mod:`ast` (nothing is imported):

* ``builtin:stdlib`` — one document per stdlib module: the module docstring followed by the
  signature and docstring of each documented function, class and method.
* ``builtin:stdlib-qa`` — question/answer pairs ("What does `json.dumps` do?" -> the docstring's
  summary; "What arguments does `json.dumps` take?" -> its signature) with a deterministic
  held-out split keyed on the documented object, so both questions about an object share a split.

Paths are walked in sorted order and whitespace is normalised, so the result depends only on the
Python version's stdlib. Each build is cached as JSONL under ``$LLMSTACK_CACHE`` (default
``~/.cache/llmstack``) in ``corpora/<name>-<pyversion>-<key>.jsonl``, written atomically; the key
hashes the builder version and the stdlib file list (names, sizes, mtimes).
"""

from __future__ import annotations

import ast
import contextlib
import copy
import hashlib
import json
import os
import re
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Bump when the extraction changes, so stale caches are not reused.
BUILDER_VERSION = 1

# Directory names skipped anywhere in the stdlib tree (tests, IDE, third-party, tooling, data).
_SKIP_DIRS = frozenset({
    "test", "tests", "idle_test", "idlelib", "site-packages", "dist-packages", "lib2to3", "__pycache__",
    "lib-dynload", "ensurepip", "turtledemo", "pydoc_data", "__phello__", "distutils",
})
_SKIP_MODULES = frozenset({"this", "antigravity", "__hello__", "__future__"})

EVAL_PERCENT = 5  # share (in %) of documented objects whose QA pairs are held out

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z`(\"'])")
_SIG_LINE = re.compile(r"^[\w.]+\(.*\)(\s*->.*)?$")


def cache_root() -> Path:
    """Where llmstack caches built corpora and tokenizers (``$LLMSTACK_CACHE`` or ~/.cache/llmstack)."""
    return Path(os.environ.get("LLMSTACK_CACHE") or Path.home() / ".cache" / "llmstack").expanduser()


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def python_version() -> str:
    return "{}.{}.{}".format(*sys.version_info[:3])


def _module_files(root: Path) -> list[tuple[str, Path]]:
    """``(module name, path)`` for every stdlib source file we read, sorted by relative path."""
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(("config-", ".")))
        rel_dir = Path(dirpath).relative_to(root)
        if rel_dir != Path(".") and not (Path(dirpath) / "__init__.py").is_file():
            dirnames[:] = []  # not a package: nothing importable below
            continue
        for filename in sorted(filenames):
            if not filename.endswith(".py") or filename.startswith("_sysconfigdata"):
                continue
            parts = list(rel_dir.parts) + [filename[:-3]]
            if parts[-1] == "__init__":
                parts.pop()
            if not parts or parts[-1] == "__main__" or parts[0] in _SKIP_MODULES:
                continue
            found.append((".".join(parts), Path(dirpath) / filename))
    found.sort(key=lambda item: item[1].relative_to(root).as_posix())
    return found


def _source_key(files: list[tuple[str, Path]], root: Path) -> str:
    digest = hashlib.sha256(f"v{BUILDER_VERSION}|{python_version()}".encode())
    for _, path in files:
        stat = path.stat()
        digest.update(f"{path.relative_to(root).as_posix()}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def normalize_text(text: str) -> str:
    """Tabs to spaces, trailing spaces dropped, runs of blank lines collapsed to one, ends stripped."""
    lines = [line.rstrip() for line in text.expandtabs(4).replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef, *, method: bool) -> str:
    args = copy.deepcopy(node.args)
    if method and not any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in node.decorator_list):
        if args.posonlyargs:
            args.posonlyargs.pop(0)
        elif args.args:
            args.args.pop(0)
    text = ast.unparse(args)
    if node.returns is not None:
        return f"({text}) -> {ast.unparse(node.returns)}"
    return f"({text})"


def _is_public(name: str) -> bool:
    return not name.startswith("_")


def _walk_module(tree: ast.Module, module: str) -> Iterator[dict[str, Any]]:
    """Documented objects of a module: dicts with kind, qualname, signature, doc (doc may be None)."""
    yield {"kind": "module", "qualname": module, "signature": None,
           "doc": ast.get_docstring(tree, clean=True), "public": True}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield {"kind": "function", "qualname": f"{module}.{node.name}", "signature": _signature(node, method=False),
                   "doc": ast.get_docstring(node, clean=True), "public": _is_public(node.name)}
        elif isinstance(node, ast.ClassDef):
            init = next((n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
            yield {"kind": "class", "qualname": f"{module}.{node.name}",
                   "signature": _signature(init, method=True) if init is not None else None,
                   "doc": ast.get_docstring(node, clean=True), "public": _is_public(node.name)}
            for sub in node.body:
                if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)) and sub.name != "__init__":
                    yield {"kind": "method", "qualname": f"{module}.{node.name}.{sub.name}",
                           "signature": _signature(sub, method=True), "doc": ast.get_docstring(sub, clean=True),
                           "public": _is_public(node.name) and _is_public(sub.name)}


def _parse(path: Path) -> ast.Module | None:
    try:
        return ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, OSError):
        return None  # a file this Python cannot parse is not part of its documentation


def _module_public(module: str) -> bool:
    return all(_is_public(part) for part in module.split("."))


def _module_document(tree: ast.Module, module: str) -> str | None:
    sections: list[str] = []
    for obj in _walk_module(tree, module):
        if not obj["doc"]:
            continue
        doc = normalize_text(obj["doc"])
        if obj["kind"] == "module":
            sections.append(f"Module {module}\n\n{doc}")
        else:
            prefix = "class " if obj["kind"] == "class" else ""
            sections.append(f"{prefix}{obj['qualname']}{obj['signature'] or ''}\n\n{doc}")
    if not sections:
        return None
    if not sections[0].startswith("Module "):
        sections.insert(0, f"Module {module}")
    return "\n\n".join(sections)


def build_stdlib_documents(files: list[tuple[str, Path]] | None = None) -> list[str]:
    """One normalised document per stdlib module with at least one docstring (sorted by path)."""
    return _build_all(files)["stdlib"]


def summary(doc: str, *, max_sentences: int = 2, max_chars: int = 320) -> str | None:
    """The first sentence(s) of a docstring's first paragraph, on one line; None if nothing useful."""
    paragraphs = [p for p in normalize_text(doc).split("\n\n") if p.strip()]
    while paragraphs and _SIG_LINE.match(paragraphs[0].strip().split("\n")[0]) and "\n" not in paragraphs[0]:
        paragraphs.pop(0)  # C-style "name(args) -> result" header lines carry no prose
    if not paragraphs:
        return None
    text = " ".join(line.strip() for line in paragraphs[0].split("\n"))
    sentences = _SENTENCE_END.split(text)
    out = ""
    for sentence in sentences[:max_sentences]:
        candidate = f"{out} {sentence}".strip()
        if out and len(candidate) > max_chars:
            break
        out = candidate
    if len(out) > max_chars:
        out = out[: max_chars - 3].rsplit(" ", 1)[0] + "..."
    if len(out) < 12 or not any(c.isalpha() for c in out):
        return None
    return out


def qa_split(qualname: str) -> str:
    """``"eval"`` for a deterministic ~EVAL_PERCENT% of documented objects, else ``"train"``."""
    bucket = int(hashlib.sha256(qualname.encode()).hexdigest()[:8], 16) % 100
    return "eval" if bucket < EVAL_PERCENT else "train"


def _module_qa(tree: ast.Module, module: str) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    for obj in _walk_module(tree, module):
        if not obj["public"]:
            continue
        name, split = obj["qualname"], qa_split(obj["qualname"])
        about = summary(obj["doc"]) if obj["doc"] else None
        if obj["kind"] == "module":
            if about:
                rows.append({"prompt": f"What is the `{name}` module for?", "response": about, "split": split})
            continue
        if not about:
            continue  # undocumented objects get no questions at all
        rows.append({"prompt": f"What does the {obj['kind']} `{name}` do?", "response": about, "split": split})
        signature = obj["signature"]
        if signature and signature not in ("()", "() -> None") and len(signature) <= 160:
            target = f"the `{name}` constructor" if obj["kind"] == "class" else f"`{name}`"
            rows.append({"prompt": f"What arguments does {target} take?",
                         "response": f"The signature is `{name}{signature}`.", "split": split})
    return rows


def build_stdlib_qa(files: list[tuple[str, Path]] | None = None) -> list[dict[str, str]]:
    """Question/answer rows ``{"prompt", "response", "split"}`` from public stdlib documentation."""
    return _build_all(files)["stdlib-qa"]


def _build_all(files: list[tuple[str, Path]] | None = None) -> dict[str, list[Any]]:
    """Both builtins in one pass over the stdlib (each file is parsed once)."""
    files = _module_files(stdlib_dir()) if files is None else files
    documents: list[str] = []
    qa: list[dict[str, str]] = []
    for module, path in files:
        tree = _parse(path)
        if tree is None:
            continue
        document = _module_document(tree, module)
        if document is not None:
            documents.append(document)
        if _module_public(module):
            qa.extend(_module_qa(tree, module))
    return {"stdlib": documents, "stdlib-qa": qa}


# --------------------------------------------------------------------------- caching


def _write_jsonl_atomic(path: Path, rows: list[Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_jsonl(path: Path) -> list[Any]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _cached(name: str) -> list[Any]:
    """Rows of builtin ``name`` from the on-disk cache, building (and caching) both builtins if absent."""
    root = stdlib_dir()
    files = _module_files(root)
    key = _source_key(files, root)
    directory = cache_root() / "corpora"
    path = directory / f"{name}-{python_version()}-{key}.jsonl"
    if path.is_file():
        try:
            return _read_jsonl(path)
        except (OSError, ValueError):
            pass  # a damaged cache entry is rebuilt below
    built = _build_all(files)
    for other, rows in built.items():
        with contextlib.suppress(OSError):  # read-only home: still works, just rebuilt next time
            _write_jsonl_atomic(directory / f"{other}-{python_version()}-{key}.jsonl", rows)
    return built[name]


def stdlib_documents() -> list[str]:
    """The ``builtin:stdlib`` documents (cached)."""
    return _cached("stdlib")


def stdlib_qa_rows(split: str | None = "train") -> list[dict[str, str]]:
    """``builtin:stdlib-qa`` rows ``{"prompt", "response"}`` of one split (``None``: all rows)."""
    rows = _cached("stdlib-qa")
    return [{"prompt": r["prompt"], "response": r["response"]} for r in rows if split is None or r["split"] == split]
