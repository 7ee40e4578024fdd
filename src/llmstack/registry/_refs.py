"""Names and references: ``name``, ``name@vN`` and ``name@alias``.

Names and aliases become path segments in local directories and object-store keys, so they are
checked against one strict pattern before they touch storage: no path separators, no ``..``, no
percent-encoding, no leading dot, nothing outside ASCII letters, digits, ``.``, ``_`` and ``-``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from llmstack.errors import RegistryError

MAX_NAME_LENGTH = 100
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*", re.ASCII)
_VERSION_RE = re.compile(r"[vV]?([0-9]+)", re.ASCII)
#: Selectors with a fixed meaning that cannot be used as alias names.
RESERVED_ALIASES = frozenset({"latest"})
_NAME_RULE = ("allowed: 1-100 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit, "
              "no '..'")


def _problem(text: str, what: str) -> str | None:
    """Why ``text`` is not a valid name/alias, or None when it is."""
    if not isinstance(text, str):
        return f"{what} must be a string, got {type(text).__name__}"
    if not text:
        return f"{what} is empty"
    if len(text) > MAX_NAME_LENGTH:
        return f"{what} {text[:20]!r}... is {len(text)} characters long (at most {MAX_NAME_LENGTH})"
    if not _NAME_RE.fullmatch(text) or ".." in text or text.endswith("."):
        return f"invalid {what} {text!r}"
    return None


def validate_name(name: str, *, what: str = "artifact name") -> str:
    """Return ``name`` unchanged if it is a safe artifact name, else raise :class:`RegistryError`."""
    problem = _problem(name, what)
    if problem:
        raise RegistryError(f"{problem}; {_NAME_RULE}")
    return name


def validate_alias(alias: str) -> str:
    """Return ``alias`` if it can name an alias (a valid name, not ``latest``, not ``vN``)."""
    validate_name(alias, what="alias")
    if alias in RESERVED_ALIASES or _VERSION_RE.fullmatch(alias):
        raise RegistryError(f"alias {alias!r} is reserved: 'latest' and version-like names (v3, 12) "
                            "have a fixed meaning; pick another alias such as 'production'")
    return alias


def parse_version(selector: str) -> int | None:
    """``"v3"``/``"3"`` -> 3; anything else -> None."""
    match = _VERSION_RE.fullmatch(selector)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class ArtifactRef:
    """An immutable, concrete registry version: ``name@vN``.

    Example:
        >>> str(ArtifactRef("tiny-lm", 3))
        'tiny-lm@v3'
        >>> ArtifactRef.parse("tiny-lm@production")
        ('tiny-lm', 'production')
    """

    name: str
    version: int

    def __post_init__(self) -> None:
        validate_name(self.name)
        if isinstance(self.version, bool) or not isinstance(self.version, int) or self.version < 1:
            raise RegistryError(f"version of {self.name!r} must be an integer >= 1, got {self.version!r}")

    def __str__(self) -> str:
        return f"{self.name}@v{self.version}"

    @staticmethod
    def parse(text: str) -> tuple[str, str | None]:
        """Split ``name[@selector]`` into its parts, validating both.

        Raises:
            RegistryError: the name or selector is not syntactically valid.
        """
        if isinstance(text, ArtifactRef):
            return text.name, f"v{text.version}"
        if not isinstance(text, str):
            raise RegistryError(f"a registry reference must be a string, got {type(text).__name__}")
        name, sep, selector = text.partition("@")
        validate_name(name)
        if not sep:
            return name, None
        problem = _problem(selector, "version or alias")
        if problem:
            raise RegistryError(f"bad reference {text!r}: {problem}; use name, name@vN or name@alias")
        if parse_version(selector) == 0:
            raise RegistryError(f"bad reference {text!r}: versions start at v1")
        return name, selector

    @staticmethod
    def concrete(text: str | ArtifactRef) -> ArtifactRef:
        """Parse a pinned ``name@vN`` (no alias resolution: that needs a registry).

        Raises:
            RegistryError: ``text`` is not of the form ``name@vN``.
        """
        if isinstance(text, ArtifactRef):
            return text
        name, selector = ArtifactRef.parse(text)
        version = parse_version(selector) if selector else None
        if version is None:
            raise RegistryError(f"{text!r} is not a concrete reference; expected name@vN")
        return ArtifactRef(name, version)

    @staticmethod
    def looks_like(text: str) -> bool:
        """Whether ``text`` is syntactically a registry reference (``name``, ``name@vN``, ``name@alias``)."""
        try:
            ArtifactRef.parse(text)
        except RegistryError:
            return False
        return True
