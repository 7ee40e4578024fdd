"""One file serves both `serve run` and `llmstack deploy --config`: serve_app_args and its use in load_config."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from llmstack.cli import _config, build_parser, main
from llmstack.config import SERVE_APP_BUILDER, ServeConfig, load_config, serve_app_args
from llmstack.errors import ConfigError

SERVE_CONFIGS = Path(__file__).parents[2] / "serve_configs"


def test_a_serve_file_loads_as_the_apps_serve_config():
    cfg = load_config(ServeConfig, SERVE_CONFIGS / "tiny.yaml")  # what llmstack.deploy("serve_configs/tiny.yaml") does
    args = yaml.safe_load((SERVE_CONFIGS / "tiny.yaml").read_text())["applications"][0]["args"]
    assert cfg == load_config(ServeConfig, {**args, "app_name": "llmstack",
                                            "http": {"route_prefix": "/", "host": "127.0.0.1", "port": 8000}})
    assert (cfg.model, cfg.autoscaling.max_replicas) == ("tiny-lm@production", 2)
    lora = load_config(ServeConfig, SERVE_CONFIGS / "tiny-lora.yaml", ["http.port=8123"])
    assert (lora.app_name, lora.adapters, lora.http.port) == ("llmstack-lora", ["tiny-lm-lora"], 8123)
    assert lora.http.host == "127.0.0.1"  # the override changed one key of the file's http section


def test_the_deploy_verb_reads_a_serve_file_with_overrides():
    args = build_parser().parse_args(["deploy", "--config", str(SERVE_CONFIGS / "tiny.yaml"), "http.port=8123",
                                      "autoscaling.max_replicas=3"])
    cfg = _config(ServeConfig, args)
    assert (cfg.http.port, cfg.autoscaling.max_replicas, cfg.app_name) == (8123, 3, "llmstack")


def test_a_bad_override_on_the_shipped_file_is_one_line_and_non_zero(capsys):
    code = main(["deploy", "--config", str(SERVE_CONFIGS / "tiny.yaml"), "engine.max_batch_size=0"])
    err = capsys.readouterr().err
    assert code != 0
    assert err.count("\n") == 1
    assert err.startswith("llmstack: error: 1 config problem in ") and "engine.max_batch_size: must be >= 1, got 0" in err


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d["applications"].append({**d["applications"][0], "name": "second"}),
     "applications: expected exactly one application, got 2 (llmstack, second)"),
    (lambda d: d["applications"][0].update(import_path="my_pkg.app:build"),
     "applications[0].import_path: expected llmstack.serve:build_app, got 'my_pkg.app:build'"),
    (lambda d: d["applications"][0].update(deployments=[{"name": "LLMServer", "num_replicas": 2}]),
     "applications[0].deployments: not carried into the app's args"),
    (lambda d: d["http_options"].update(request_timeout_s=5), "http_options.request_timeout_s: not carried"),
    (lambda d: d.update(applications=[]), "applications: expected exactly one application, got 0"),
])
def test_what_deploy_cannot_honour_is_refused_in_one_line(tmp_path, capsys, mutate, expected):
    data = yaml.safe_load((SERVE_CONFIGS / "tiny.yaml").read_text())
    mutate(data)
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="^1 config problem in .*: " + re.escape(expected)):
        load_config(ServeConfig, path)
    assert main(["deploy", "--config", str(path)]) != 0
    assert capsys.readouterr().err.count("\n") == 1


def test_a_canary_file_is_read_with_the_canary_builder_only():
    data = yaml.safe_load((SERVE_CONFIGS / "canary.yaml").read_text())
    with pytest.raises(ConfigError, match=r"import_path: expected llmstack\.serve:build_app"):
        serve_app_args(data)
    flat = serve_app_args(data, import_path="llmstack.serve.canary:build_canary_app")
    assert (flat["app_name"], flat["stable"], flat["http"]["port"]) == ("llmstack-canary", "tiny-lm@production", 8000)


def test_plain_configs_pass_through_unchanged():
    plain = {"model": "tiny-lm@v1", "http": {"port": 8001}}
    assert serve_app_args(plain) is plain
    assert SERVE_APP_BUILDER == "llmstack.serve:build_app"
