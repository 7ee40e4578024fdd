"""Versioned artifact registry on fsspec: immutable ``name@vN`` versions, manifests, aliases, lineage.

May import: ``errors`` (checked by tests/unit/test_import_graph.py).

Example:
    >>> from llmstack.registry import Registry
    >>> reg = Registry("memory://registry-doc")
    >>> reg.list()
    []
"""

from llmstack.registry._format import format_history, format_list, format_manifest
from llmstack.registry._manifest import KINDS, Manifest
from llmstack.registry._refs import ArtifactRef, validate_alias, validate_name
from llmstack.registry._registry import PICKLE_SUFFIXES, Registry, validation_key

__all__ = ["KINDS", "PICKLE_SUFFIXES", "ArtifactRef", "Manifest", "Registry", "format_history", "format_list",
           "format_manifest", "validate_alias", "validate_name", "validation_key"]
