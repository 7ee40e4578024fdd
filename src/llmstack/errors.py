"""The one exception family that llmstack raises for user-facing problems.

Everything a user can cause (bad config, missing file, unknown reference, tampered artifact,
a cluster too small for the request, a bad HTTP request) derives from :class:`LLMStackError`.
The CLI turns these into a one-line message and a non-zero exit; the HTTP layer turns them into
their status code and the OpenAI error body (``to_openai()``); anything else is a bug and keeps
its traceback. Every error pickles with its fields, so it crosses Ray process boundaries intact.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class LLMStackError(Exception):
    """Base class of every error llmstack raises on purpose, with the HTTP status and OpenAI fields it maps to.

    Subclasses set class-level defaults; any instance may override them by keyword.
    """

    status_code: int = 500
    type: str = "server_error"
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = {}  # noqa: RUF012 - replaced per instance, never mutated

    def __init__(self, message: str = "", *, status_code: int | None = None, type: str | None = None,
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        for name, value in (("status_code", status_code), ("type", type), ("param", param), ("code", code),
                            ("headers", headers)):
            if value is not None:
                setattr(self, name, value)

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI nested error object ``{"error": {"message", "type", "param", "code"}}``."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def __reduce__(self) -> tuple[Any, ...]:  # keep keyword fields across pickling (Ray handles, tasks)
        return (_restore, (type(self), self.args, dict(self.__dict__)))


def _restore(cls: type[LLMStackError], args: tuple[Any, ...], state: dict[str, Any]) -> LLMStackError:
    error = cls.__new__(cls)
    Exception.__init__(error, *args)
    error.__dict__.update(state)
    return error


class ConfigError(LLMStackError, ValueError):
    """One or more configuration problems, each named by its key path."""

    status_code = 400
    type = "invalid_request_error"
    code = "invalid_config"

    def __init__(self, problems: Iterable[str] | str, *, source: str | None = None) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        count = len(self.problems)
        head = f"{count} config problem{'s' if count != 1 else ''}{where}: "
        super().__init__(head + "; ".join(self.problems))


class DataError(LLMStackError, ValueError):
    """Input data is missing, empty, unreadable or malformed (names the file and line)."""

    status_code = 400
    type = "invalid_request_error"


class RegistryError(LLMStackError):
    """A registry operation failed (bad name, write conflict, unreachable storage)."""


class ArtifactNotFoundError(RegistryError, LookupError):
    """A reference names a version, alias or artifact that does not exist."""

    status_code = 404
    type = "not_found_error"
    code = "not_found"


class IntegrityError(RegistryError):
    """A stored artifact does not match its manifest (tampered, partial or corrupted)."""


class AliasConflictError(RegistryError):
    """An alias moved under us: another writer changed it first."""

    status_code = 409
    type = "conflict_error"
    code = "alias_conflict"


class ModelLoadError(LLMStackError):
    """A model or tokenizer could not be loaded from the given source."""


class ResourceError(LLMStackError):
    """The request cannot fit the cluster or hardware (workers, GPUs, kernels, ports)."""

    status_code = 503
    type = "service_unavailable"


class ValidationFailedError(LLMStackError):
    """A release gate failed and the action it guards was refused."""

    status_code = 403
    type = "permission_error"
    code = "refused"


class RequestError(LLMStackError):
    """An HTTP/engine request that is refused or cannot be served (bad field, unknown model, overload, ...).

    Defaults to a 400 ``invalid_request_error``; ``param`` names the offending request field.
    """

    status_code = 400
    type = "invalid_request_error"


def model_not_found(model: str, known: list[str]) -> RequestError:
    return RequestError(f"The model {model!r} does not exist; served models: {', '.join(known)}",
                        status_code=404, type="not_found_error", param="model", code="model_not_found")


__all__ = [
    "AliasConflictError",
    "ArtifactNotFoundError",
    "ConfigError",
    "DataError",
    "IntegrityError",
    "LLMStackError",
    "ModelLoadError",
    "RegistryError",
    "RequestError",
    "ResourceError",
    "ValidationFailedError",
    "model_not_found",
]
