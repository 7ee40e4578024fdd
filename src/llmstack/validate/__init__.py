"""The release gate: statistical comparison of a candidate model with a baseline.

May import: ``_verbs``, ``config``, ``data``, ``errors``, ``models``, ``registry`` (checked by
tests/unit/test_import_graph.py).

Example:
    >>> from llmstack.validate import validate
    >>> report = validate(candidate="tiny-lm-int8@v1", baseline="tiny-lm@production")  # doctest: +SKIP
    >>> report.passed, report.failed_checks  # doctest: +SKIP
"""

from llmstack.validate._config import ValidateConfig
from llmstack.validate._report import CheckResult, ValidationReport
from llmstack.validate._validate import DEFAULT_PROBES, IncomparableModelsError, validate

__all__ = ["DEFAULT_PROBES", "CheckResult", "IncomparableModelsError", "ValidateConfig", "ValidationReport",
           "validate"]
