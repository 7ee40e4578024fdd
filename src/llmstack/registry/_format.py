"""Plain-text views of registry contents for the terminal (used by the CLI)."""

from __future__ import annotations

import json
from typing import Any

from llmstack.registry._manifest import Manifest


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def format_list(manifests: list[Manifest], aliases: dict[str, dict[str, int]] | None = None) -> str:
    """One line per version: ref, kind, size, created, parents, aliases."""
    if not manifests:
        return "(registry is empty)"
    aliases = aliases or {}
    rows = [("REF", "KIND", "SIZE", "CREATED", "PARENTS", "ALIASES")]
    for m in manifests:
        tags = sorted(a for a, v in aliases.get(m.ref.name, {}).items() if v == m.ref.version)
        rows.append((str(m.ref), m.kind, _size(m.total_size), m.created_at[:19].replace("T", " "),
                     ",".join(m.parents) or "-", ",".join(tags) or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows)


def format_manifest(shown: dict[str, Any]) -> str:
    """A ``Registry.show()`` dict as readable text."""
    lines = [f"{shown['ref']}  ({shown['kind']})",
             f"  created:   {shown.get('created_at', '')}",
             f"  parents:   {', '.join(shown.get('parents') or []) or '-'}",
             f"  aliases:   {', '.join(shown.get('aliases') or []) or '-'}",
             f"  data:      {shown.get('data_fingerprint') or '-'}"]
    if shown.get("metrics"):
        lines.append("  metrics:   " + ", ".join(f"{k}={v}" for k, v in sorted(shown["metrics"].items())))
    if shown.get("library_versions"):
        lines.append("  libraries: " + ", ".join(f"{k} {v}" for k, v in sorted(shown["library_versions"].items())))
    lines.append(f"  files ({len(shown['files'])}):")
    for rel, info in sorted(shown["files"].items()):
        lines.append(f"    {rel:<40} {_size(info['size']):>10}  sha256:{info['sha256'][:16]}")
    if shown.get("config"):
        lines.append("  config:    " + json.dumps(shown["config"], sort_keys=True)[:400])
    for key, data in sorted((shown.get("annotations") or {}).items()):
        summary = data.get("summary") if isinstance(data, dict) else None
        lines.append(f"  annotation {key}: {summary or json.dumps(data, sort_keys=True)[:200]}")
    return "\n".join(lines)


def format_history(events: list[dict[str, Any]]) -> str:
    """One line per alias move: when, action, alias, from -> to, who, why, report verdict."""
    if not events:
        return "(no promotions, rollbacks or alias changes recorded)"
    lines = []
    for e in events:
        frm = "-" if e.get("from") is None else f"v{e['from']}"
        report = e.get("report")
        verdict = ""
        if report:
            verdict = f"  [{'PASS' if report.get('passed') else 'FAIL'} vs {report.get('baseline')}]"
        elif e.get("action") in ("promote", "force-promote") and e.get("from") is not None:
            verdict = "  [no report]"
        why = f"  reason: {e['reason']}" if e.get("reason") else ""
        lines.append(f"{e['at'][:19].replace('T', ' ')}  {e['action']:<13} {e['name']}@{e['alias']}: "
                     f"{frm} -> v{e['to']}  by {e.get('by', '?')}{verdict}{why}")
    return "\n".join(lines)
