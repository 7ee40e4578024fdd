"""The release gate: statistical comparison of a candidate model with a baseline.

Example:
    >>> from llmstack.validate import validate
    >>> report = validate("tiny-lm-int8@v1", "tiny-lm@production")  # doctest: +SKIP
    >>> report.passed, report.failed_checks  # doctest: +SKIP
"""

from llmstack.validate._config import ValidateConfig
from llmstack.validate._report import CheckResult, ValidationReport
from llmstack.validate._validate import DEFAULT_PROBES, IncomparableModelsError, validate

__all__ = ["DEFAULT_PROBES", "CheckResult", "IncomparableModelsError", "ValidateConfig", "ValidationReport",
           "validate"]

from llmstack._modules import make_callable  # noqa: E402

make_callable(__name__, validate)
