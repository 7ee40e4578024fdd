"""Read the stage config of each manifest kind and check what a cluster of fresh pods can run.

``train`` and ``finetune`` read a :class:`~llmstack.config.TrainConfig` / ``FinetuneConfig``; ``serve``
and ``canary`` read a ``serve run`` file (``serve_configs/*.yaml``) through
:func:`llmstack.config.serve_app_args`, the same function ``llmstack deploy --config`` uses.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llmstack.config import (
    SERVE_APP_BUILDER,
    FinetuneConfig,
    ServeConfig,
    TrainConfig,
    apply_overrides,
    load_config,
    serve_app_args,
    to_dict,
)
from llmstack.errors import ConfigError
from llmstack.k8s.options import looks_secret

JOB_KINDS = ("train", "finetune")
SERVICE_KINDS = ("serve", "canary")
KINDS = JOB_KINDS + SERVICE_KINDS
CANARY_APP_BUILDER = "llmstack.serve.canary:build_canary_app"
APP_PLACEMENT_KEYS = ("app_name",)  # serve_app_args lifts these out of the app, and HTTP_PLACEMENT_KEYS into `http`
HTTP_PLACEMENT_KEYS = ("route_prefix", "host", "port")
LOCAL_ONLY_SCHEMES = ("file://", "memory://")


@dataclass
class Stage:
    """A parsed stage config and what the manifest takes from it."""

    kind: str  # train | finetune | serve | canary
    config: Any  # TrainConfig, FinetuneConfig or (serve, canary) the ServeConfig
    canary: Any = None  # canary: its CanaryConfig
    app_args: dict[str, Any] = field(default_factory=dict)  # serve kinds: the builder's args, as in the file
    import_path: str = ""  # serve kinds: the application's builder


def load_stage(kind: str, source: str | Path | Mapping[str, Any] | Any, overrides: Iterable[str],
               problems: list[str]) -> Stage | None:
    """Parse ``source`` (file, dict or config object) as the stage config of ``kind``; problems go to ``problems``.

    Returns None when the config does not parse (its problems are in ``problems``).
    """
    data, where = _read(source)
    try:
        if kind in JOB_KINDS:
            return _job_stage(kind, data, list(overrides), where, problems)
        return _service_stage(kind, data, list(overrides), where, problems)
    except ConfigError as exc:
        problems.extend(exc.problems)
        return None


def _job_stage(kind: str, data: Any, overrides: list[str], where: str | None, problems: list[str]) -> Stage | None:
    if isinstance(data, Mapping) and "applications" in data:
        problems.append(f"applications: {where or 'this config'} is a Serve application file; "
                        f"a RayJob ({kind}) runs a config of `llmstack {kind}`: use `llmstack k8s render serve`")
        return None
    cls = TrainConfig if kind == "train" else FinetuneConfig
    data = apply_overrides(data, overrides)
    if isinstance(data, Mapping):
        data = _drop_misplaced(data, _only_fields(ServeConfig, cls), problems,
                               f"serving options; a RayJob ({kind}) cannot express them "
                               "(render the Serve app with `llmstack k8s render serve`)")
    config = load_config(cls, data)
    problems.extend(_inline_credentials(to_dict(config)))
    problems.extend(_job_storage_problems(config))
    return Stage(kind=kind, config=config)


def _service_stage(kind: str, data: Any, overrides: list[str], where: str | None,
                   problems: list[str]) -> Stage | None:
    builder = SERVE_APP_BUILDER if kind == "serve" else CANARY_APP_BUILDER
    from_file = isinstance(data, Mapping) and "applications" in data
    flat = serve_app_args(data, source=where, import_path=builder)
    flat = apply_overrides(flat, overrides)
    if not isinstance(flat, Mapping):
        raise ConfigError(f"<root>: expected a mapping, got {type(flat).__name__}")
    job_only = _only_fields(TrainConfig, ServeConfig) | _only_fields(FinetuneConfig, ServeConfig)
    flat = _drop_misplaced(flat, job_only, problems,
                           f"RayJob (train/finetune) options; a RayService ({kind}) runs a Serve app and "
                           "cannot express them (render that config with `llmstack k8s render train`)")
    canary = None
    if kind == "canary":
        from llmstack.serve.canary import load_canary_config

        canary, config = load_canary_config(dict(flat))
    else:
        config = load_config(ServeConfig, dict(flat))
    if config.http.api_key is not None:
        file_http = _file_args(data).get("http") if from_file else None
        in_file = isinstance(file_http, Mapping) and file_http.get("api_key") is not None
        path = "applications[0].args.http.api_key" if in_file else "http.api_key"
        problems.append(f"{path}: an inline API key cannot go into a manifest; put it in a Secret and pass "
                        "k8s.api_key_secret=NAME/KEY (the app reads it from the pod's environment)")
    problems.extend(_service_storage_problems(config, canary))
    args = {k: v for k, v in flat.items() if k not in APP_PLACEMENT_KEYS}
    http = {k: v for k, v in (args.pop("http", None) or {}).items() if k not in HTTP_PLACEMENT_KEYS}
    if http:
        args["http"] = http
    return Stage(kind=kind, config=config, canary=canary, app_args=args, import_path=builder)


def job_entrypoint(stage: Stage) -> str:
    """The RayJob entrypoint: ``llmstack train|finetune`` with every non-default field as an override.

    The command line carries the whole config, so the job needs no mounted file; parsing it back
    with ``llmstack``'s own parser gives an equal config.
    """
    defaults = to_dict(type(stage.config)())
    words = ["llmstack", stage.kind]
    for key, value in _flatten(to_dict(stage.config), defaults, ""):
        words.append(f"{key}={_scalar(value)}")
    return " ".join(shlex.quote(word) for word in words)


def _flatten(data: Mapping[str, Any], defaults: Mapping[str, Any] | None, prefix: str) -> Iterable[tuple[str, Any]]:
    """Leaves of ``data`` that differ from ``defaults``; a section that differs at all is given whole.

    A section in a config replaces its default as a whole (FinetuneConfig's ``training`` defaults are not
    LoopConfig's), so a lone ``training.max_steps=...`` would not reproduce the other fields.
    """
    for key, value in data.items():
        if defaults is not None and value == defaults.get(key):
            continue
        if isinstance(value, Mapping) and value:
            yield from _flatten(value, None, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _scalar(value: Any) -> str:
    """A value as the override parser reads it back (YAML): plain when unambiguous, else JSON."""
    if isinstance(value, str) and value and " " not in value and yaml.safe_load(value) == value:
        return value
    return json.dumps(value)


def _job_storage_problems(config: TrainConfig | FinetuneConfig) -> list[str]:
    problems = []
    for key in ("storage_path", "registry"):
        value = getattr(config, key)
        if not _is_object_store(value):
            what = "checkpoints" if key == "storage_path" else "the registered result"
            problems.append(f"{key}: a RayJob's pods are deleted when it ends, so {what} must go to an object "
                            f"store URL (e.g. s3://bucket/{'runs' if key == 'storage_path' else 'registry'}), "
                            f"got {value!r}")
    if not config.data.source.startswith("builtin:") and "://" not in config.data.source:
        problems.append(f"data.source: a local path is not in the pods; use builtin:... or an object store URL, "
                        f"got {config.data.source!r}")
    if isinstance(config, FinetuneConfig):
        if config.base is None:
            problems.append("base: a fine-tune job needs a base model (a registry ref such as tiny-lm-base@v1)")
        elif _is_local_path(config.base):
            problems.append(f"base: a local path is not in the pods; use a registry ref, got {config.base!r}")
    elif config.model.source is not None and _is_local_path(config.model.source):
        problems.append(f"model.source: a local path is not in the pods; use a registry ref or hub id, "
                        f"got {config.model.source!r}")
    return problems


def _service_storage_problems(config: ServeConfig, canary: Any) -> list[str]:
    problems = []
    if not _is_object_store(config.registry):
        problems.append(f"registry: the pods load the model from the registry, so it must be an object store URL "
                        f"(e.g. registry=s3://bucket/registry), got {config.registry!r}")
    models = [("model", config.model)] if canary is None else (
        [("stable", canary.stable), ("candidate", canary.candidate)]
        + [(f"versions[{i}].model", v.model) for i, v in enumerate(canary.versions)])
    models += [(f"adapters[{i}]", a.partition("=")[2] or a) for i, a in enumerate(config.adapters)]
    for key, source in models:
        if source is not None and _is_local_path(source):
            problems.append(f"{key}: a local path is not in the pods; use a registry ref, got {source!r}")
    return problems


def _inline_credentials(data: Any, prefix: str = "") -> list[str]:
    """Every credential written into a config's ``storage_options`` (at any depth), by key path."""
    problems: list[str] = []
    if not isinstance(data, Mapping):
        return problems
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key == "storage_options" and isinstance(value, Mapping):
            problems.extend(
                f"{path}.{name}: an inline credential cannot go into a manifest; put it in a Secret with "
                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and pass k8s.storage_secret=NAME"
                for name in value if looks_secret(str(name)))
        else:
            problems.extend(_inline_credentials(value, path + "."))
    return problems


def _drop_misplaced(data: Mapping[str, Any], keys: set[str], problems: list[str], why: str) -> dict[str, Any]:
    """``data`` without ``keys``; those present become one problem naming them all."""
    misplaced = [key for key in data if key in keys]
    if misplaced:
        problems.append(f"{', '.join(misplaced)}: {why}")
    return {k: v for k, v in data.items() if k not in misplaced}


def _only_fields(cls: type, other: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)} - {f.name for f in dataclasses.fields(other)}


def _is_object_store(url: str | None) -> bool:
    return bool(url) and "://" in str(url) and not str(url).startswith(LOCAL_ONLY_SCHEMES)


def _is_local_path(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~", "file://"))


def _file_args(data: Mapping[str, Any]) -> Mapping[str, Any]:
    app = data["applications"][0]
    return app.get("args") or {}


def _read(source: Any) -> tuple[Any, str | None]:
    if source is None:
        return {}, None
    if dataclasses.is_dataclass(source) and not isinstance(source, type):
        return to_dict(source), None
    if isinstance(source, Mapping):
        return dict(source), None
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}, str(path)
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"not valid YAML: {exc}".replace("\n", " "), source=str(path)) from None

