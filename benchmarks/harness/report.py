"""Reporting: RESULTS.md sections, markdown tables, results JSON."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

BENCHMARKS_DIR = Path(__file__).resolve().parents[1]
RESULTS_MD = BENCHMARKS_DIR / "RESULTS.md"
RESULTS_DIR = BENCHMARKS_DIR / "results"


def write_section(name: str, section: str, path: Path = RESULTS_MD) -> None:
    """Replace the ``## name`` section of RESULTS.md with ``section`` (append it if there is none)."""
    text = path.read_text(encoding="utf-8") if path.is_file() else "# Benchmark results\n"
    pattern = re.compile(rf"^## {re.escape(name)}\n.*?(?=^## |\Z)", re.S | re.M)
    section = section.rstrip("\n") + "\n"
    if pattern.search(text):
        text = pattern.sub(lambda _m: section + "\n", text).rstrip("\n") + "\n"
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text, encoding="utf-8")


def write_json(path: Path | str, data: Any, *, indent: int = 1, default: Any = None, newline: bool = False) -> Path:
    """Write ``data`` as JSON to ``path`` (a bare name goes under benchmarks/results/ with ``.json``), creating
    the folder; ``default`` as in ``json.dumps`` (``str`` for paths and dataclasses)."""
    target = Path(path)
    if target.parent == Path(".") and not target.is_absolute():
        target = RESULTS_DIR / (target.name if target.suffix else f"{target.name}.json")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(data, indent=indent, default=default) + ("\n" if newline else ""), encoding="utf-8")
    return target


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]], *, align: str | None = None) -> list[str]:
    """A markdown table as lines: ``header``, an alignment row, then one line per row.

    ``align`` has one letter per column, ``l`` (``---``) or ``r`` (``---:``); default: the first column left,
    the others right (numbers).
    """
    align = align or "l" + "r" * (len(header) - 1)
    if len(align) != len(header):
        raise ValueError(f"align {align!r} has {len(align)} letters for {len(header)} columns")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines

