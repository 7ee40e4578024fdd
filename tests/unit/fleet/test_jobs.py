"""`llmstack jobs` without a cluster: the job's kind, its config checked before submitting, the fit check,
the Ray token it sends, and an unreachable address as one line."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import yaml

from llmstack.cli import main
from llmstack.config import WorkersConfig
from llmstack.errors import ConfigError, ResourceError
from llmstack.fleet.jobs import auth_headers, autoscaler_node_types, check_job_fits, job_kind, resolve_job_config


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # released on exit: nothing listens there


@pytest.mark.parametrize(("config", "kind", "expected"), [
    ({"kind": "finetune", "name": "a"}, None, "finetune"),
    ({"base": "tiny-lm@v1"}, None, "finetune"),
    ({"lora": {"rank": 4}}, None, "finetune"),
    ({"model": {"preset": "tiny"}}, None, "train"),
    ({"model": {"preset": "tiny"}}, "finetune", "finetune"),  # --kind wins
])
def test_the_kind_comes_from_the_flag_the_config_or_its_keys(config: dict, kind: str | None, expected: str) -> None:
    assert job_kind(config, kind) == expected


def test_a_config_without_any_hint_of_its_kind_asks_for_one() -> None:
    with pytest.raises(ConfigError, match=r"kind: must be one of train, finetune .*--kind train\|finetune"):
        job_kind({"name": "x", "training": {"max_steps": 3}})


def test_the_config_is_validated_before_anything_is_submitted(tmp_path: Path) -> None:
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump({"kind": "train", "training": {"max_step": 3}, "scaling": {"num_workers": [2, 1]}}))
    with pytest.raises(ConfigError) as caught:
        resolve_job_config(path)
    assert "training.max_step" in str(caught.value) and "scaling.num_workers: min must be <= max" in str(caught.value)


def test_relative_registry_and_storage_paths_become_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    kind, cfg = resolve_job_config({"model": {"preset": "tiny"}, "storage_path": "runs"}, overrides=["name=lm"],
                                   registry="reg")
    assert kind == "train" and cfg.name == "lm"
    assert cfg.registry == str(tmp_path / "reg") and cfg.storage_path == str(tmp_path / "runs")
    _, cfg = resolve_job_config({"base": "x@v1", "storage_path": "s3://bucket/runs"})
    assert cfg.storage_path == "s3://bucket/runs"


def test_a_worker_larger_than_every_node_fails_naming_the_resources() -> None:
    nodes = [{"CPU": 1.0, "memory": 1e9}, {"CPU": 2.0}]
    check_job_fits(WorkersConfig(cpus_per_worker=2), nodes)  # fits the second node
    with pytest.raises(ResourceError, match=r"one worker needs CPU 4 \(scaling\.cpus_per_worker=4\) but the largest "
                                            r"of its 2 nodes has CPU 2"):
        check_job_fits(WorkersConfig(cpus_per_worker=4), nodes)
    with pytest.raises(ResourceError, match=r"needs CPU 1, GPU 1 .* has CPU 2, GPU 0"):
        check_job_fits(WorkersConfig(cpus_per_worker=1, use_gpu=True), nodes)
    check_job_fits(WorkersConfig(cpus_per_worker=64), [])  # no node registered yet: nothing to judge by


def test_the_ray_token_is_sent_unless_auth_is_disabled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert auth_headers() == {}  # no token anywhere
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("file-token\n")
    assert auth_headers() == {"Authorization": "Bearer file-token"}
    monkeypatch.setenv("RAY_AUTH_TOKEN", "env-token")
    assert auth_headers() == {"Authorization": "Bearer env-token"}
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert auth_headers() == {}


def test_an_unreachable_address_is_one_line_naming_it(capsys: pytest.CaptureFixture[str]) -> None:
    address = f"http://127.0.0.1:{closed_port()}"
    assert main(["jobs", "status", "some-job", "--address", address]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert f"no Ray cluster answers at {address}" in err


def test_submit_reports_config_problems_before_connecting(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"name": "x"}))
    # The address is never reached: the missing kind is reported first.
    assert main(["jobs", "submit", "--config", str(path), "--address", f"http://127.0.0.1:{closed_port()}"]) == 2
    assert "kind: must be one of train, finetune" in capsys.readouterr().err


def test_a_worker_larger_than_every_node_now_is_left_to_the_driver_when_an_autoscaler_adds_nodes() -> None:
    nodes = [{"CPU": 0.0}]  # an autoscaling cluster's head, no worker node up yet
    with pytest.raises(ResourceError):
        check_job_fits(WorkersConfig(cpus_per_worker=1), nodes)
    check_job_fits(WorkersConfig(cpus_per_worker=1), nodes, autoscaling=True)  # check_cluster judges node types


def test_only_a_real_autoscalers_node_types_count_not_the_readonly_mirror() -> None:
    readonly = {"autoscalerReport": {"activeNodes": {"nodeAb12": 1},
                                     "nodeTypeMapping": {"ab12" * 14: "node_" + "ab12" * 14}, "pendingNodes": []}}
    assert autoscaler_node_types(readonly) == set()  # a fixed cluster's monitor mirrors each node as node_<id>
    scaling = {"autoscalerReport": {"nodeTypeMapping": {"c0ffee" * 9: "ray.head.default"},
                                    "pendingNodes": [["10.0.0.2", "cpu1", "setting-up"]]}}
    assert autoscaler_node_types(scaling) == {"ray.head.default", "cpu1"}
    assert autoscaler_node_types(None) == set() and autoscaler_node_types({}) == set()


def test_the_job_entrypoint_runs_the_verb_on_the_config_from_its_environment(
        monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> None:
    from llmstack.fleet.job_entry import JOB_CONFIG_ENV
    from llmstack.fleet.job_entry import main as job_entry

    monkeypatch.delenv(JOB_CONFIG_ENV, raising=False)
    assert job_entry(["train"]) == 2
    assert f"config in {JOB_CONFIG_ENV} (got arguments ['train'], 0 characters" in capfd.readouterr().err
    # The config reaches `llmstack train --config FILE` (a child process): its validation names the misspelt key.
    monkeypatch.setenv(JOB_CONFIG_ENV, yaml.safe_dump({"name": "lm", "training": {"max_step": 3}}))
    assert job_entry(["train"]) == 2
    assert "training.max_step" in capfd.readouterr().err
