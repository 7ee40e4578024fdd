"""Configs shaped like their verbs: every shipped config loads in the nested shape, every old flat key is
refused with its new key path, and a serve config's ``deployment:`` reaches Serve's options verbatim."""

from __future__ import annotations

import ast
import dataclasses
import re
import shlex
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmstack._verbs import read_settings
from llmstack.config import (
    MOVED_KEYS,
    SERVE_DEPLOYMENT_DEFAULTS,
    FinetuneConfig,
    QuantizeConfig,
    ReplicaAutoscalingConfig,
    ServeConfig,
    TrainConfig,
    load_config,
    serve_app_args,
)
from llmstack.errors import ConfigError

REPO = Path(__file__).parents[2]
SERVE_CONFIGS = sorted((REPO / "serve_configs").glob("*.yaml"))
README = (REPO / "README.md").read_text(encoding="utf-8")
OLD_KEY_EXAMPLE = {"engine": "vllm", "calibration": "builtin:stdlib"}  # old keys that are sections now


def _field_hint(cls: type, path: str) -> Any:
    """The type hint at dotted ``path`` under ``cls`` (KeyError when a part is not a field)."""
    hint: Any = cls
    for part in path.split("."):
        if not dataclasses.is_dataclass(hint):
            raise KeyError(f"{path}: {part} is inside a non-section field")
        hint = typing.get_type_hints(hint)[part]
    return hint


def _moved_cases() -> list[tuple[type, str, str]]:
    return [(cls, old, new) for cls, table in MOVED_KEYS.items() for old, new in table.items()]


@pytest.mark.parametrize("cls, old, new", _moved_cases(), ids=lambda v: getattr(v, "__name__", v))
def test_the_moved_keys_table_points_at_real_keys(cls: type, old: str, new: str) -> None:
    fields = {f.name for f in dataclasses.fields(cls)}
    assert old not in fields or dataclasses.is_dataclass(_field_hint(cls, old)), f"{old} is still a plain field"
    for target in re.findall(r"[a-z_][a-z_0-9.]*\.[a-z_0-9.]+", new):  # e.g. "a.b (x) or c.d (y)"
        if target.startswith("deployment."):
            option = target.split(".")[1]
            assert option in SERVE_DEPLOYMENT_DEFAULTS, target
        else:
            _field_hint(cls, target)


@pytest.mark.parametrize("cls, old, new", _moved_cases(), ids=lambda v: getattr(v, "__name__", v))
def test_an_old_key_is_refused_naming_its_new_path(cls: type, old: str, new: str) -> None:
    value = OLD_KEY_EXAMPLE.get(old, 1)
    with pytest.raises(ConfigError) as info:
        load_config(cls, {old: value})
    assert info.value.problems == [f"{old}: moved to {new}; set it there instead"]


def test_old_keys_in_a_file_and_in_overrides_are_all_reported_at_once(tmp_path: Path) -> None:
    old = {"model": "tiny-lm@v1", "vllm_kv_cache_gb": 1.0, "engine": "vllm", "num_cpus": 0.5,
           "autoscaling": {"max_replicas": 3, "forecast_alpha": 0.3}, "http": {"port": 0}}
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(old))
    with pytest.raises(ConfigError) as info:
        load_config(ServeConfig, path, ["port=8001", "max_batch_size=4"])
    assert sorted(info.value.problems) == sorted([
        "vllm_kv_cache_gb: moved to engine.vllm.kv_cache_gb; set it there instead",
        "engine: moved to engine.kind; set it there instead",
        "num_cpus: moved to deployment.ray_actor_options.num_cpus; set it there instead",
        "autoscaling.forecast_alpha: moved to autoscaling.predictive.forecast_alpha; set it there instead",
        "port: moved to http.port; set it there instead",
        "max_batch_size: moved to engine.max_batch_size; set it there instead",
        "http.port: must be a TCP port, got 0",  # a range problem beside them is reported too
    ])
    with pytest.raises(ConfigError, match=r"alpha: moved to smoothquant\.alpha.*evaluate: moved to "
                                          r"evaluation\.enabled"):
        load_config(QuantizeConfig, None, ["alpha=0.3", "evaluate=false"])


def test_old_keys_are_refused_beside_a_canary_and_a_regions_app() -> None:
    from llmstack.serve.canary import load_canary_config
    from llmstack.serve.routing.regions_config import load_regions_config

    with pytest.raises(ConfigError, match=r"num_threads: moved to engine\.num_threads"):
        load_canary_config({"stable": "tiny-lm@v1", "candidate": "tiny-lm@v2", "num_threads": 1})
    with pytest.raises(ConfigError, match=r"max_ongoing_requests: moved to deployment\.max_ongoing_requests"):
        load_regions_config({"model": "tiny-lm@v1", "regions": {"us-east": {}}, "max_ongoing_requests": 8})


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_serve_config_loads_in_the_new_shape(path: Path) -> None:
    from llmstack.serve.canary import load_canary_config
    from llmstack.serve.routing.regions_config import REGIONS_APP_BUILDER, load_regions_config

    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    builder = data["applications"][0]["import_path"]
    if builder == "llmstack.serve.canary:build_canary_app":
        _, serve_cfg = load_canary_config(serve_app_args(data, import_path=builder))
    elif builder == REGIONS_APP_BUILDER:
        _, serve_cfg = load_regions_config(str(path))
    else:
        serve_cfg = load_config(ServeConfig, path)
    args = data["applications"][0]["args"]
    assert serve_cfg.http.port == data["http_options"]["port"]
    assert serve_cfg.replica_resources()["CPU"] == args["deployment"]["ray_actor_options"]["num_cpus"]
    assert serve_cfg.engine.max_batch_size == args["engine"]["max_batch_size"]


def test_deployment_options_pass_through_to_serve_and_unknown_ones_are_named() -> None:
    from llmstack.serve.deployments.builder import replica_resources, server_options

    cfg = load_config(ServeConfig, {"deployment": {
        "max_ongoing_requests": 16, "health_check_period_s": 7.0, "max_replicas_per_node": 1,
        "ray_actor_options": {"num_cpus": 0.5, "memory": 2**30}}})
    options = server_options(cfg)
    assert options["max_ongoing_requests"] == 16 and options["health_check_period_s"] == 7.0
    assert options["max_replicas_per_node"] == 1
    assert options["ray_actor_options"] == {"num_cpus": 0.5, "memory": 2**30}  # merged over the default num_cpus
    assert options["max_queued_requests"] == SERVE_DEPLOYMENT_DEFAULTS["max_queued_requests"]  # a default kept
    assert replica_resources(cfg) == {"CPU": 0.5, "GPU": 0.0}
    with pytest.raises(ConfigError) as info:
        load_config(ServeConfig, {"deployment": {"max_ongoing_request": 16, "num_replicas": 3,
                                                 "max_ongoing_requests": 4}})
    problems = "\n".join(info.value.problems)
    assert "deployment.max_ongoing_request: not a Ray Serve deployment option (known: version, " in problems
    assert "deployment.num_replicas: llmstack sets it from autoscaling.min_replicas/max_replicas" in problems
    assert "deployment.max_ongoing_requests: must be >= engine.max_batch_size (8) so batches can fill" in problems


def test_the_known_serve_options_are_the_ones_ray_serve_takes() -> None:
    import inspect

    from ray import serve

    from llmstack.config import SERVE_DEPLOYMENT_OPTIONS, SERVE_OPTIONS_SET_BY

    taken = set(inspect.signature(serve.deployment).parameters) - {"_func_or_class"}
    assert set(SERVE_DEPLOYMENT_OPTIONS) | set(SERVE_OPTIONS_SET_BY) == taken


# --------------------------------------------------------------------------- README examples


def _readme_commands(verb: str) -> list[list[str]]:
    joined = README.replace("\\\n", " ")  # continuation lines
    lines = re.findall(rf"^(?:llmstack|python -m llmstack) {verb}\b.*$", joined, flags=re.M)
    return [shlex.split(line, comments=True) for line in lines]


def _overrides(argv: list[str]) -> list[str]:
    return [word for word in argv if "=" in word and not word.startswith("-")]


def test_every_readme_key_value_example_loads() -> None:
    checked = 0
    for verb, cls in (("train", TrainConfig), ("finetune", FinetuneConfig), ("quantize", QuantizeConfig),
                      ("replay", ReplicaAutoscalingConfig)):
        for argv in _readme_commands(verb):
            # quantize's source and name are the verb's inputs, not config keys
            inputs = {"source": None, "name": None} if verb == "quantize" else None
            read_settings(verb, cls, None, _overrides(argv), inputs=inputs)
            checked += 1
    for argv in _readme_commands("deploy"):
        source = REPO / argv[argv.index("--config") + 1] if "--config" in argv else None
        load_config(ServeConfig, source, _overrides(argv))
        checked += 1
    assert checked >= 8  # the examples were found (train, finetune, quantize, replay x2, deploy x2, ...)


def test_every_readme_deploy_dict_and_config_yaml_loads() -> None:
    calls = re.findall(r"llmstack\.deploy\((.+?)\)(?: as \w+:)?$", README, flags=re.M)
    for call in calls:  # a config mapping and/or keyword settings, read as deploy() reads them
        parsed = ast.parse(f"f({call})", mode="eval").body
        config = ast.literal_eval(parsed.args[0]) if parsed.args else None
        settings = {kw.arg: ast.literal_eval(kw.value) for kw in parsed.keywords}
        read_settings("deploy", ServeConfig, config, None, settings)
    configuration = README.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```yaml\n(.*?)```", configuration, flags=re.S)
    for block in blocks:
        load_config(ServeConfig, yaml.safe_load(block))
    assert len(calls) >= 2 and len(blocks) >= 1
