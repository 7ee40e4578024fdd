"""Offline checks of rendered manifests: the pinned KubeRay v1.7.0 CRD schemas (kuberay/README.md) and
Ray's own Serve schema; plus the shipped configs every test renders."""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

SCHEMA_DIR = Path(__file__).parent / "kuberay"
KUBERAY_VERSION = "v1.7.0"
REPO = Path(__file__).parents[3]
SERVE_FILES = {"tiny.yaml": "serve", "tiny-lora.yaml": "serve", "canary.yaml": "canary"}  # serve_configs/*
JOB_FILES = {"train.yaml": "train", "finetune.yaml": "finetune"}  # tests/unit/k8s/configs/*
IMAGE = "ghcr.io/acme/llmstack:0.1"
CLUSTER = ["registry=s3://llmstack/registry", "k8s.storage_secret=s3-creds"]  # what pods need beyond a config
SCHEMA_FILES = {"RayJob": "rayjob-v1.schema.json", "RayService": "rayservice-v1.schema.json"}


@functools.cache
def validator(kind: str) -> jsonschema.protocols.Validator:
    """A validator of the kind's ``openAPIV3Schema``, strict about unknown fields like ``kubectl apply``."""
    schema = json.loads((SCHEMA_DIR / SCHEMA_FILES[kind]).read_text(encoding="utf-8"))
    return jsonschema.Draft4Validator(_closed(schema))


def schema_errors(manifest: dict[str, Any]) -> list[str]:
    """Every schema violation of ``manifest`` as ``path: message`` (empty when it validates)."""
    errors = validator(manifest["kind"]).iter_errors(manifest)
    return sorted(f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors)


def serve_config_errors(manifest: dict[str, Any]) -> list[str]:
    """Problems Ray's own ``ServeDeploySchema`` finds in a RayService's ``serveConfigV2``."""
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    try:
        ServeDeploySchema.model_validate(yaml.safe_load(manifest["spec"]["serveConfigV2"]))
    except ValidationError as exc:
        return [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
    return []


def _closed(schema: Any) -> Any:
    """The schema with ``additionalProperties: false`` on every object that lists its properties."""
    schema = copy.deepcopy(schema)
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return schema


def config_path(name: str) -> Path:
    """A shipped config: serve_configs/<name> for Serve apps, tests/unit/k8s/configs/<name> for jobs."""
    return REPO / "serve_configs" / name if name in SERVE_FILES else Path(__file__).parent / "configs" / name


@pytest.fixture(params=sorted({**SERVE_FILES, **JOB_FILES}))
def shipped(request: pytest.FixtureRequest) -> tuple[str, Path]:
    """(kind, path) of each shipped config."""
    return {**SERVE_FILES, **JOB_FILES}[request.param], config_path(request.param)


@pytest.fixture(name="schema_errors")
def schema_errors_fixture() -> Any:
    """:func:`schema_errors`: ``path: message`` for each KubeRay CRD schema violation."""
    return schema_errors


@pytest.fixture(name="serve_config_errors")
def serve_config_errors_fixture() -> Any:
    """:func:`serve_config_errors`: what ``ray.serve.schema.ServeDeploySchema`` rejects in serveConfigV2."""
    return serve_config_errors


@pytest.fixture
def render() -> Any:
    """``render(kind, config, *overrides, **kwargs)``: the manifest with the test image and object store."""
    from llmstack.k8s import render_manifest

    def _render(kind: str, config: Any, *overrides: str, **kwargs: Any) -> dict[str, Any]:
        kwargs.setdefault("image", IMAGE)
        return render_manifest(kind, config, overrides=[*CLUSTER, *overrides], **kwargs)

    return _render


@pytest.fixture(name="config_path")
def config_path_fixture() -> Any:
    """:func:`config_path`: the path of a shipped config by file name."""
    return config_path
