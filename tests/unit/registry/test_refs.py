"""Reference parsing and name validation: the registry's first line of defence for storage paths."""

from __future__ import annotations

import pytest

from llmstack.errors import RegistryError
from llmstack.registry import ArtifactRef, validate_alias, validate_name


def test_str_and_parse_round_trip() -> None:
    ref = ArtifactRef("tiny-lm", 3)
    assert str(ref) == "tiny-lm@v3"
    assert ArtifactRef.parse(str(ref)) == ("tiny-lm", "v3")
    assert ArtifactRef.parse("tiny-lm@production") == ("tiny-lm", "production")
    assert ArtifactRef.parse("tiny_lm.int8") == ("tiny_lm.int8", None)


@pytest.mark.parametrize("text", ["tiny", "tiny@v1", "tiny@production", "a.b_c-d@v12", "X9", "9x@latest"])
def test_looks_like_accepts(text: str) -> None:
    assert ArtifactRef.looks_like(text)


BAD_NAMES = ["", "..", "../etc", "a/b", "a\\b", "%2e%2e", "a%2Fb", ".hidden", "-dash", "a..b", "a.", "a b",
             "naïve", "a\nb", "a" * 101, "/abs", "a@", "a@@b", "a@v0", "a@../x", "a@b/c"]


@pytest.mark.parametrize("text", BAD_NAMES)
def test_bad_references_rejected(text: str) -> None:
    assert not ArtifactRef.looks_like(text)
    with pytest.raises(RegistryError):
        ArtifactRef.parse(text)


@pytest.mark.parametrize("name", ["..", "a/b", "%2e%2e", ".x", "", "x" * 101, "a\\b", "tiny\n"])
def test_validate_name_rejects_with_rule(name: str) -> None:
    with pytest.raises(RegistryError, match="allowed"):
        validate_name(name)


def test_artifact_ref_checks_fields() -> None:
    with pytest.raises(RegistryError):
        ArtifactRef("ok", 0)
    with pytest.raises(RegistryError):
        ArtifactRef("ok", True)  # type: ignore[arg-type]
    with pytest.raises(RegistryError):
        ArtifactRef("../x", 1)


@pytest.mark.parametrize("alias", ["latest", "v3", "12"])
def test_reserved_aliases(alias: str) -> None:
    with pytest.raises(RegistryError, match="reserved"):
        validate_alias(alias)
    assert validate_alias("production") == "production"
