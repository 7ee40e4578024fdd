"""A registry with tiny-lm@v1 (production) and tiny-lm@v2, for the canary owners' gate and promotion (no Ray)."""

from __future__ import annotations

from pathlib import Path

from llmstack.registry import Registry, validation_key


def two_versions(tmp_path: Path, *, v2_passed: bool) -> Registry:
    """tiny-lm@v1 (aliased production) and tiny-lm@v2 with a validation report against v1 that passed or not."""
    files = tmp_path / "files"
    files.mkdir()
    (files / "weights.txt").write_text("not a real model: the gate reads only annotations")
    registry = Registry(str(tmp_path / "registry"))
    v1 = registry.register("tiny-lm", files, kind="model")
    v2 = registry.register("tiny-lm", files, kind="model", parents=[str(v1)])
    registry.set_alias("tiny-lm", "production", v1)
    report = {"passed": v2_passed, "baseline": str(v1), "failed_checks": [] if v2_passed else ["perplexity"]}
    registry.annotate(v2, validation_key(v1), report)
    return registry
