"""The one shape of the public verbs, and how each reads its settings.

Every verb (``train``, ``finetune_lora``, ``distill``, ``sweep``, ``quantize``, ``validate``, ``deploy``) is::

    verb(config=None, *, registry=None, overrides=(), <verb inputs>=None, **settings) -> result

and reads one document of settings, built in layers (a later layer wins):

1. ``config``: the verb's config dataclass, a mapping of its fields, a YAML file path, or None (defaults);
2. ``overrides``: ``key.path=value`` strings (the CLI's form) or a mapping of key paths to Python values;
3. ``settings``: top-level keys as Python values (``method="nf4"``, ``training={"max_steps": 5}``);
   a mapping merges into its section instead of replacing it.

Beside the config's fields, a verb may read a few *inputs* that are not config (quantize's ``source`` and
``name``, validate's ``candidate`` and ``baseline``): they come from the same layers (as top-level keys of
the mapping or YAML file, as ``key=value`` overrides) or from their keyword arguments, which win.
Each verb's model is one key of that document, :data:`MODEL_KEYS`; the CLI's optional ``MODEL``
positional sets it, the same for every verb.

Imports nothing heavy: ``llmstack/__init__`` reaches this through the verb packages.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar, Union

from llmstack.errors import ConfigError

C = TypeVar("C")

#: ``key.path=value`` strings, or a mapping of key paths to values.
Overrides = Union[Iterable[str], Mapping[str, Any]]

#: The settings key that names each verb's model (the CLI's optional ``MODEL`` positional sets it).
MODEL_KEYS: dict[str, str] = {
    "train": "model.source",  # a model to continue pretraining (None: a fresh preset)
    "finetune_lora": "base",
    "distill": "teacher",
    "sweep": "base",
    "quantize": "source",
    "validate": "candidate",
    "deploy": "model",
}


def read_settings(verb: str, cls: type[C], config: Any, overrides: Overrides | None = None,
                  settings: Mapping[str, Any] | None = None, *,
                  inputs: Mapping[str, Any] | None = None) -> tuple[C, dict[str, Any]]:
    """The verb's config and its non-config inputs, read from the layers described in the module docstring.

    Args:
        verb: the public function's name (names the model key in error messages).
        cls: the verb's config dataclass.
        config: a ``cls`` instance, a mapping, a YAML file path, or None.
        overrides: ``key.path=value`` strings or a mapping of key paths to values.
        settings: the verb's ``**settings`` keywords (top-level config keys).
        inputs: the verb's own inputs as given by keyword (None: not given); their names are the keys
            that are read out of the config document instead of being config fields.

    Returns:
        ``(config, inputs)``: the parsed ``cls`` and every input name mapped to its value (None when unset).

    Raises:
        ConfigError: every problem at once, each named by its key path; a string ``config`` that is not a
            file says how to pass a model instead.
    """
    given = dict(inputs or {})
    found: dict[str, Any] = {}  # the inputs read from the layers, before the keywords
    source = _config_source(verb, cls, config)
    where = str(source) if isinstance(source, Path) else None
    if given and isinstance(source, Path):
        raw = _read_yaml(source)
        if isinstance(raw, Mapping) and any(key in raw for key in given):
            source = raw
    if given and isinstance(source, Mapping):  # the verb's own inputs sit beside the config's fields
        found.update({key: value for key, value in source.items() if key in given})
        source = {key: value for key, value in source.items() if key not in given}

    if isinstance(overrides, str):
        raise ConfigError(f"overrides: expected a list of key.path=value strings or a mapping, got the string "
                          f"{overrides!r}; wrap it in a list")
    strings: list[str] = []  # key.path=value overrides of the config
    values: list[tuple[str, Any]] = []  # (key.path, value) settings of the config
    if isinstance(overrides, Mapping):
        for key, value in overrides.items():
            if key in given:
                found[key] = value
            else:
                values.append((str(key), value))
    else:
        for item in overrides or ():
            key, sep, raw_value = str(item).partition("=")
            if sep and key.strip() in given:
                found[key.strip()] = _parse_scalar(raw_value)
            else:
                strings.append(str(item))
    values += _flatten(settings or {})
    found.update({name: value for name, value in given.items() if value is not None})

    from llmstack.config import load_config

    problems: list[str] = []
    strings += [override for key, value in values if (override := _as_override(key, value, problems))]
    if problems:
        raise ConfigError(problems)
    try:
        cfg = load_config(cls, source, strings)  # one pass: every problem of every layer reported together
    except ConfigError as exc:
        if where and exc.source is None:
            raise ConfigError(exc.problems, source=where) from None
        raise
    return cfg, {name: found.get(name) for name in given}


def open_registry(registry: Any = None, configured: str | None = None) -> Any:
    """A :class:`~llmstack.registry.Registry` from a verb's ``registry`` argument (a Registry or URL), else the
    config's ``registry`` key, else the default (``$LLMSTACK_REGISTRY`` or ``~/.llmstack/registry``)."""
    from llmstack.registry import Registry

    if isinstance(registry, Registry):
        return registry
    return Registry(registry or configured)


def _config_source(verb: str, cls: type, config: Any) -> Any:
    """Check the kind of ``config``; a string that names no file gets a message on how to pass a model."""
    if config is None or isinstance(config, (cls, Mapping)):
        return config
    if isinstance(config, (str, Path)):
        path = Path(config).expanduser()
        if path.is_file():
            return path
        if path.suffix in (".yaml", ".yml"):
            raise ConfigError(f"config file not found: {config}")
        key = MODEL_KEYS.get(verb, "model")
        example = f"{verb}({key}={str(config)!r})" if "." not in key else f"overrides={{'{key}': {str(config)!r}}}"
        raise ConfigError(f"config file not found: {config} (config is a {cls.__name__}, a mapping or a YAML path); "
                          f"to name the model, set `{key}` instead, e.g. {example}")
    if dataclasses.is_dataclass(config):
        raise ConfigError(f"config: {verb}() takes a {cls.__name__}, got a {type(config).__name__}")
    raise ConfigError(f"config: expected a {cls.__name__}, a mapping or a YAML path, got {type(config).__name__}")


def _read_yaml(path: str | Path) -> Any:
    import yaml

    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"not valid YAML: {exc}".replace("\n", " "), source=str(path)) from None


def _parse_scalar(raw: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        return raw


def _flatten(settings: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """``{"training": {"max_steps": 5}}`` -> ``[("training.max_steps", 5)]``; an empty mapping stays a value."""
    pairs: list[tuple[str, Any]] = []
    for key, value in settings.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            pairs += _flatten(value, path + ".")
        else:
            pairs.append((path, value))
    return pairs


def _as_override(key: str, value: Any, problems: list[str]) -> str | None:
    """``key=value`` in the override syntax, the value written as YAML so that it reads back equal."""
    import yaml

    from llmstack.config import to_dict

    plain = to_dict(value)
    if isinstance(plain, Path):
        plain = str(plain)
    try:
        text = yaml.safe_dump(plain, default_flow_style=True, width=1 << 30)
    except yaml.YAMLError:
        problems.append(f"{key}: a {type(value).__name__} cannot be a config value; give plain data (str, number, "
                        "bool, list, mapping)")
        return None
    return f"{key}={text.removesuffix(chr(10)).removesuffix(chr(10) + '...')}"
