"""The gate's verdict: one pass/fail per check with its numbers, as text and as JSON."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llmstack.registry import ArtifactRef


@dataclass
class CheckResult:
    """One check of the gate.

    Attributes:
        name: distribution, loglik_shift, perplexity, latency or sanity.
        passed: whether the candidate is within the thresholds.
        metrics: the measured numbers.
        thresholds: the limits applied.
        detail: one human sentence on why it passed or failed.
    """

    name: str
    passed: bool
    metrics: dict[str, Any] = field(default_factory=dict)
    thresholds: dict[str, Any] = field(default_factory=dict)
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "passed": self.passed, "metrics": _clean(self.metrics),
                "thresholds": _clean(self.thresholds), "detail": self.detail}


@dataclass
class ValidationReport:
    """Result of :func:`llmstack.validate`: per-check verdicts and an overall pass/fail.

    Example:
        >>> report = validate(candidate="tiny-lm@v4", baseline="tiny-lm@production")  # doctest: +SKIP
        >>> print(report.to_text())  # doctest: +SKIP
    """

    candidate: str
    baseline: str
    checks: list[CheckResult]
    created_at: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    @property
    def ref(self) -> ArtifactRef | None:
        """The candidate as a registry version (the one the report is stored on), or None for a local model."""
        from llmstack.errors import RegistryError
        from llmstack.registry import ArtifactRef

        try:
            return ArtifactRef.concrete(self.candidate)
        except RegistryError:
            return None

    @property
    def failed_checks(self) -> list[str]:
        return [c.name for c in self.checks if not c.passed]

    @property
    def summary(self) -> str:
        if self.passed:
            return f"PASS: {self.candidate} is no worse than {self.baseline} ({len(self.checks)} checks)"
        return f"FAIL: {self.candidate} vs {self.baseline}: {', '.join(self.failed_checks)} failed"

    def check(self, name: str) -> CheckResult:
        """The check called ``name``."""
        for item in self.checks:
            if item.name == name:
                return item
        raise KeyError(f"no check {name!r}; checks: {', '.join(c.name for c in self.checks)}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict; also what ``Registry.promote`` reads (``passed``, ``baseline``, ``summary``)."""
        return {"candidate": self.candidate, "baseline": self.baseline, "passed": self.passed,
                "summary": self.summary, "failed_checks": self.failed_checks,
                "checks": [c.to_dict() for c in self.checks], "created_at": self.created_at,
                "config": _clean(self.config), "info": _clean(self.info)}

    def to_json(self, *, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ValidationReport:
        checks = [CheckResult(name=c["name"], passed=bool(c["passed"]), metrics=dict(c.get("metrics", {})),
                              thresholds=dict(c.get("thresholds", {})), detail=c.get("detail", ""))
                  for c in data.get("checks", [])]
        return cls(candidate=data["candidate"], baseline=data["baseline"], checks=checks,
                   created_at=data.get("created_at", ""), config=dict(data.get("config", {})),
                   info=dict(data.get("info", {})))

    def to_text(self) -> str:
        """A terminal-friendly table: one block per check with its numbers and limits."""
        lines = [f"validate {self.candidate}  against  {self.baseline}", ""]
        for c in self.checks:
            lines.append(f"  [{'PASS' if c.passed else 'FAIL'}] {c.name:<13} {c.detail}")
            numbers = ", ".join(f"{k}={_fmt(v)}" for k, v in c.metrics.items())
            if numbers:
                lines.append(f"         {numbers}")
            limits = ", ".join(f"{k}={_fmt(v)}" for k, v in c.thresholds.items())
            if limits:
                lines.append(f"         limits: {limits}")
        lines += ["", self.summary]
        return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, float):
        return str(value)
    if math.isnan(value) or math.isinf(value):
        return str(value)
    if value == 0 or 1e-3 <= abs(value) < 1e5:
        return f"{value:.4g}"
    return f"{value:.3e}"


def _clean(value: Any) -> Any:
    """Strict-JSON copy: non-finite floats become strings."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
