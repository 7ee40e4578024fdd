from __future__ import annotations

import pytest

from llmstack.config import (
    ServeConfig,
    TrainConfig,
    apply_overrides,
    load_config,
    save_config,
    to_dict,
    to_yaml,
)
from llmstack.errors import ConfigError, LLMStackError


def test_defaults_and_overrides_parse_yaml_scalars():
    cfg = load_config(TrainConfig, {"training": {"max_steps": 10}},
                      ["scaling.num_workers=1", "training.learning_rate=1e-3", "scaling.strategy=fsdp",
                       "training.activation_checkpointing=true", "model.max_seq_len=null"])
    assert cfg.training.max_steps == 10
    assert cfg.scaling.num_workers == 1
    assert cfg.training.learning_rate == pytest.approx(1e-3)
    assert cfg.scaling.strategy == "fsdp"
    assert cfg.training.activation_checkpointing is True
    assert cfg.model.max_seq_len is None


def test_every_problem_is_reported_with_its_key_path():
    with pytest.raises(ConfigError) as info:
        load_config(TrainConfig, {
            "trainig": {},                                   # unknown top-level key
            "training": {"micro_batch_size": 0,              # out of range
                         "learning_rate": "fast",            # wrong type
                         "precision": "fp8"},                # not an allowed value
            "scaling": {"num_workers": 2.5, "bogus": 1},     # wrong type + unknown nested key
            "model": {"preset": "gigantic"},                 # unknown preset
        })
    problems = info.value.problems
    joined = "\n".join(problems)
    for expected in ("trainig: unknown key", "training.learning_rate: expected a number",
                     "training.precision: must be one of", "scaling.num_workers: expected an integer",
                     "scaling.bogus: unknown key", "model.preset: unknown preset 'gigantic'"):
        assert expected in joined, joined
    # a section with a type error is not range-checked until it parses, but other sections still are
    assert len(problems) >= 6
    assert isinstance(info.value, LLMStackError)


def test_range_checks_name_the_key():
    with pytest.raises(ConfigError, match=r"training\.micro_batch_size: must be >= 1, got 0"):
        load_config(TrainConfig, {"training": {"micro_batch_size": 0}})
    with pytest.raises(ConfigError, match=r"autoscaling\.max_replicas: must be >= min_replicas"):
        load_config(ServeConfig, {"autoscaling": {"min_replicas": 3, "max_replicas": 2}})


def test_yaml_round_trip(tmp_path):
    cfg = load_config(TrainConfig, None, ["name=demo", "data.storage_options.endpoint_url=http://x"])
    path = save_config(cfg, tmp_path / "train.yaml")
    again = load_config(TrainConfig, path)
    assert again == cfg
    assert to_dict(again)["data"]["storage_options"] == {"endpoint_url": "http://x"}
    assert "name: demo" in to_yaml(cfg)


def test_file_errors_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(TrainConfig, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("training: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(TrainConfig, bad)
    notmap = tmp_path / "list.yaml"
    notmap.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(TrainConfig, notmap)


def test_malformed_overrides():
    with pytest.raises(ConfigError, match="expected key.path=value"):
        apply_overrides({}, ["novalue"])
    with pytest.raises(ConfigError, match="training.max_steps: expected an integer"):
        load_config(TrainConfig, None, ["training.max_steps=ten"])
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(TrainConfig, None, ["training=3"])


def test_a_section_given_in_part_keeps_its_parent_defaults() -> None:
    """Fine-tuning's own defaults for its sections (the instruction corpus, 100 steps) survive a partial section:
    before, ``data.block_size=64`` silently switched the data to the pretraining corpus and 200 steps."""
    from llmstack.config import FinetuneConfig

    default = FinetuneConfig()
    for given in ({"data": {"block_size": 64}, "training": {"learning_rate": 1e-4}},):
        cfg = load_config(FinetuneConfig, given)
        assert cfg.data.source == default.data.source == "builtin:stdlib-qa" and cfg.data.block_size == 64
        assert cfg.training.max_steps == default.training.max_steps and cfg.training.learning_rate == 1e-4
    cfg = load_config(FinetuneConfig, None, ["data.block_size=64", "training.learning_rate=0.0001"])
    assert (cfg.data.source, cfg.data.block_size, cfg.training.max_steps) == (default.data.source, 64,
                                                                               default.training.max_steps)
