"""One verb shape: every public verb reads its settings the same way, and the CLI is built from one table."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any

import pytest

from llmstack._verbs import MODEL_KEYS, read_settings
from llmstack.cli import VERB_COMMANDS, main
from llmstack.config import QuantizeConfig, TrainConfig
from llmstack.errors import ConfigError, LLMStackError

VERBS = {name: importlib.import_module(module).__dict__[name] for name, module in [
    ("train", "llmstack.train.driver"), ("finetune_lora", "llmstack.finetune.lora"),
    ("distill", "llmstack.finetune.distill"), ("sweep", "llmstack.finetune.sweep"),
    ("quantize", "llmstack.quantize._api"), ("validate", "llmstack.validate._validate"),
    ("deploy", "llmstack.serve.deployments.builder")]}


@pytest.mark.parametrize("name", sorted(VERBS))
def test_every_verb_has_the_one_shape(name: str) -> None:
    parameters = list(inspect.signature(VERBS[name]).parameters.values())
    config, rest = parameters[0], parameters[1:]
    assert (config.name, config.default, config.kind) == ("config", None, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    assert all(p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.VAR_KEYWORD) for p in rest)
    keywords = {p.name: p for p in rest}
    assert {"registry", "overrides"} <= set(keywords) and keywords["overrides"].default == ()
    assert rest[-1].kind is inspect.Parameter.VAR_KEYWORD  # **settings: top-level config keys
    assert "Example:" in VERBS[name].__doc__ and f"{name}(" in VERBS[name].__doc__.split("Example:")[1]


def test_the_cli_table_covers_every_verb_and_names_each_model_key() -> None:
    assert {command.function.rpartition(":")[2] for command in VERB_COMMANDS} == set(VERBS) == set(MODEL_KEYS)


def test_layers_apply_in_order_and_mappings_merge_into_their_section() -> None:
    cfg, _ = read_settings("train", TrainConfig, {"name": "from-config", "training": {"max_steps": 3, "micro_batch_size": 2}},
                           ["name=from-override", "training.max_steps=4"], {"training": {"max_steps": 5}})
    assert (cfg.name, cfg.training.max_steps, cfg.training.micro_batch_size) == ("from-override", 5, 2)
    cfg, _ = read_settings("train", TrainConfig, TrainConfig(name="instance"), {"model.source": "tiny-lm@v1"}, {})
    assert (cfg.name, cfg.model.source) == ("instance", "tiny-lm@v1")


def test_a_verbs_own_inputs_come_from_any_layer_and_the_keyword_wins(tmp_path: Path) -> None:
    inputs = {"source": None, "name": None}
    path = tmp_path / "quantize.yaml"
    path.write_text("source: tiny-lm@v1\nmethod: nf4\n")
    cfg, found = read_settings("quantize", QuantizeConfig, path, ["name=small"], {}, inputs=inputs)
    assert (cfg.method, found) == ("nf4", {"source": "tiny-lm@v1", "name": "small"})
    _, found = read_settings("quantize", QuantizeConfig, {"source": "a@v1"}, {"source": "b@v1"}, {}, inputs=inputs)
    assert found["source"] == "b@v1"
    _, found = read_settings("quantize", QuantizeConfig, path, ["source=b@v1"], {},
                             inputs={"source": "c@v1", "name": None})
    assert found == {"source": "c@v1", "name": None}


def test_every_problem_is_reported_at_once_with_its_key_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        read_settings("train", TrainConfig, None, ["scaling.num_workers=0"], {"training": {"max_steps": 0}, "bogus": 1})
    message = str(info.value)
    assert "3 config problems" in message
    assert all(part in message for part in ("scaling.num_workers", "training.max_steps", "bogus: unknown key"))
    path = tmp_path / "bad.yaml"
    path.write_text("training:\n  max_steps: 0\n")
    with pytest.raises(ConfigError, match=f"in {path}: training.max_steps"):
        read_settings("train", TrainConfig, path, [], {"name": "x"})


@pytest.mark.parametrize("config, expected", [
    ("tiny-lm@v1", r"config file not found: tiny-lm@v1 .*set `source` instead, e\.g\. quantize\(source='tiny-lm@v1'\)"),
    (TrainConfig(), "quantize\\(\\) takes a QuantizeConfig, got a TrainConfig"),
    (42, "expected a QuantizeConfig, a mapping or a YAML path, got int"),
])
def test_a_config_that_is_not_one_says_what_to_pass(config: Any, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        read_settings("quantize", QuantizeConfig, config)


def test_a_bare_string_of_overrides_is_refused() -> None:
    with pytest.raises(ConfigError, match="overrides: expected a list"):
        read_settings("train", TrainConfig, None, "name=x")


@pytest.mark.parametrize("call, expected", [
    (lambda: VERBS["quantize"]("tiny-lm@v1"), "set `source` instead"),
    (lambda: VERBS["quantize"](method="nf4"), "source: no model given"),
    (lambda: VERBS["validate"](candidate="tiny-lm@v2"), "baseline: not given"),
    (lambda: VERBS["finetune_lora"](lora={"rank": 4}), "base: no base model given"),
    (lambda: VERBS["distill"](), "teacher: no teacher model given"),
])
def test_a_verb_without_its_model_names_the_key_before_any_work(call: Any, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        call()


# --------------------------------------------------------------------------- the CLI


class _Received(LLMStackError):
    """Raised by the recording stand-in of a verb: carries what the CLI passed."""


@pytest.mark.parametrize("command", VERB_COMMANDS, ids=lambda c: c.name)
def test_every_cli_verb_passes_model_config_and_settings_the_same_way(command: Any, monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture) -> None:
    module, _, function = command.function.rpartition(":")

    def record(config: Any = None, *, registry: Any = None, overrides: Any = ()) -> Any:
        raise _Received(f"config={config} registry={registry} overrides={list(overrides)}")

    monkeypatch.setattr(importlib.import_module(module), function, record)
    code = main(["--registry", "/tmp/reg", command.name, "--config", "f.yaml", "m@v1", "a.b=1", "c=[2]"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == (f"llmstack: error: config=f.yaml registry=/tmp/reg "
                   f"overrides=['{MODEL_KEYS[function]}=m@v1', 'a.b=1', 'c=[2]']")


def test_cli_mistakes_are_one_line_and_name_the_new_spelling(capsys: pytest.CaptureFixture) -> None:
    def error(argv: list[str]) -> str:
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1
        return lines[0]

    assert "settings are key.path=value words, e.g. method=nf4" in error(["quantize", "tiny-lm@v1", "--method", "nf4"])
    assert main(["validate", "a@v1", "b@v1"]) == 2
    assert "validate takes one MODEL, got 2 (a@v1 b@v1)" in capsys.readouterr().err
    assert main(["registry", "promote", "tiny-lm@v2", "--force"]) == 2
    assert capsys.readouterr().err.strip() == ("llmstack: error: `llmstack registry promote` is now "
                                               "`llmstack promote REF [--alias ALIAS] [--force] [--reason TEXT]`")
