"""The one exception family that llmstack raises for user-facing problems.

Everything a user can cause (bad config, missing file, unknown reference, tampered artifact,
a cluster too small for the request) derives from :class:`LLMStackError`. The CLI turns these
into a one-line message and a non-zero exit; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from collections.abc import Iterable


class LLMStackError(Exception):
    """Base class of every error llmstack raises on purpose."""


class ConfigError(LLMStackError, ValueError):
    """One or more configuration problems, each named by its key path."""

    def __init__(self, problems: Iterable[str] | str, *, source: str | None = None) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        count = len(self.problems)
        head = f"{count} config problem{'s' if count != 1 else ''}{where}: "
        super().__init__(head + "; ".join(self.problems))


class DataError(LLMStackError, ValueError):
    """Input data is missing, empty, unreadable or malformed (names the file and line)."""


class RegistryError(LLMStackError):
    """A registry operation failed (bad name, write conflict, unreachable storage)."""


class ArtifactNotFoundError(RegistryError, LookupError):
    """A reference names a version, alias or artifact that does not exist."""


class IntegrityError(RegistryError):
    """A stored artifact does not match its manifest (tampered, partial or corrupted)."""


class AliasConflictError(RegistryError):
    """An alias moved under us: another writer changed it first."""


class ModelLoadError(LLMStackError):
    """A model or tokenizer could not be loaded from the given source."""


class ResourceError(LLMStackError):
    """The request cannot fit the cluster or hardware (workers, GPUs, kernels)."""


class ValidationFailedError(LLMStackError):
    """A release gate failed and the action it guards was refused."""


__all__ = [
    "AliasConflictError",
    "ArtifactNotFoundError",
    "ConfigError",
    "DataError",
    "IntegrityError",
    "LLMStackError",
    "ModelLoadError",
    "RegistryError",
    "ResourceError",
    "ValidationFailedError",
]
