"""MLflow tracking against a real file store: config params, per-step and final metrics, the registry version as
a tag; a server that does not answer costs one warning and nothing else."""

from __future__ import annotations

import socket
import time
import warnings
from pathlib import Path

import pytest

pytest.importorskip("mlflow")

from mlflow.tracking import MlflowClient  # noqa: E402

from llmstack.config import TrackingConfig, TrainConfig, load_config, to_dict  # noqa: E402
from llmstack.train.tracking import (REGISTRY_VERSION_TAG, MlflowUnavailableWarning, flatten_params,  # noqa: E402
                                     track_run)


def records(n: int) -> list[dict]:
    return [{"step": s, "loss": 3.0 / s, "lr": 1e-3, "workers": 2, "time": time.time(), "epoch": 0} for s in
            range(1, n + 1)]


def only_run(uri: str, experiment: str = "llmstack"):
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return client, run


def test_flatten_params_uses_key_paths() -> None:
    assert flatten_params({"name": "lm", "training": {"max_steps": 3}, "scaling": {"num_workers": [1, 2]},
                           "storage_options": {}}) == {
        "name": "lm", "training.max_steps": "3", "scaling.num_workers": "[1, 2]", "storage_options": "{}"}


def test_a_run_logs_its_config_steps_final_metrics_and_registry_version(tmp_path: Path) -> None:
    uri = str(tmp_path / "mlruns")
    cfg = load_config(TrainConfig, {"name": "lm", "training": {"max_steps": 4}, "tracking": {"mlflow_uri": uri}})
    with track_run(cfg.tracking, run_name=cfg.name, params=to_dict(cfg), kind="train") as tracker:
        for record in records(4):
            tracker.log_step(record)
        tracker.finish({"loss": 0.75, "step": 4, "worker_seconds": 12.5, "corpus": "builtin"},
                       registry_version="lm@v1")
    client, run = only_run(uri)
    assert run.info.status == "FINISHED" and run.info.run_name == "lm"
    assert run.data.params["training.max_steps"] == "4" and run.data.params["tracking.mlflow_uri"] == uri
    assert run.data.tags[REGISTRY_VERSION_TAG] == "lm@v1" and run.data.tags["llmstack.kind"] == "train"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(s, 3.0 / s) for s in range(1, 5)]
    assert run.data.metrics["final.loss"] == 0.75 and run.data.metrics["final.worker_seconds"] == 12.5
    assert "final.corpus" not in run.data.metrics and "time" not in run.data.metrics


def test_a_run_that_raises_ends_failed(tmp_path: Path) -> None:
    uri = str(tmp_path / "mlruns")
    with pytest.raises(RuntimeError, match="boom"):
        with track_run(TrackingConfig(mlflow_uri=uri, experiment="fleet"), run_name="x", params={}, kind="train") as t:
            t.log_step(records(1)[0])
            raise RuntimeError("boom")
    _, run = only_run(uri, "fleet")
    assert run.info.status == "FAILED"


def test_an_unanswering_server_warns_once_and_the_run_goes_on() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed once released: nothing answers there
    uri = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with track_run(TrackingConfig(mlflow_uri=uri), run_name="x", params={"a": 1}, kind="train") as tracker:
            for record in records(3):
                tracker.log_step(record)
            tracker.finish({"loss": 1.0}, registry_version="x@v1")
    mlflow_warnings = [w for w in caught if issubclass(w.category, MlflowUnavailableWarning)]
    assert len(mlflow_warnings) == 1 and uri in str(mlflow_warnings[0].message)
    assert "metrics.jsonl" in str(mlflow_warnings[0].message)
    assert time.monotonic() - started < 10  # no retrying against a dead server


def test_tracking_off_touches_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with track_run(TrackingConfig(), run_name="x", params={}, kind="train") as tracker:
        tracker.log_step(records(1)[0])
        tracker.finish({"loss": 1.0}, registry_version="x@v1")
    assert list(tmp_path.iterdir()) == []  # no ./mlruns appeared


def test_trials_nest_under_their_sweep_and_settling_tags_them_and_ends_the_ones_left_running(tmp_path: Path) -> None:
    from llmstack.train.tracking import PARENT_RUN_TAG

    uri = str(tmp_path / "mlruns")
    tracking = TrackingConfig(mlflow_uri=uri)
    with track_run(tracking, run_name="sweep", params={"ranks": [4]}, kind="sweep") as parent:
        with track_run(tracking, run_name="sweep-t1", params={"lora": {"rank": 4}}, kind="sweep trial",
                       parent_run_id=parent.run_id) as trial:
            trial.log_step(records(1)[0])
            trial.finish({"loss": 1.0, "step": 1})
        # A trial stopped from outside (ASHA): its process ends without closing its MLflow run.
        stopped = track_run(tracking, run_name="sweep-t2", params={}, kind="sweep trial",
                            parent_run_id=parent.run_id)
        stopped.__enter__()
        parent.settle_children({"sweep-t1": {"llmstack.trial_outcome": "finished"},
                                "sweep-t2": {"llmstack.trial_outcome": "stopped_early"}})
        parent.finish({"eval_loss": 0.5, "best_rank": 4}, registry_version="sweep@v1")
    client = MlflowClient(tracking_uri=uri)
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("llmstack").experiment_id])}
    assert set(runs) == {"sweep", "sweep-t1", "sweep-t2"}
    sweep_id = runs["sweep"].info.run_id
    assert PARENT_RUN_TAG not in runs["sweep"].data.tags
    assert all(runs[name].data.tags[PARENT_RUN_TAG] == sweep_id for name in ("sweep-t1", "sweep-t2"))
    assert (runs["sweep-t1"].info.status, runs["sweep-t1"].data.tags["llmstack.trial_outcome"]) == ("FINISHED",
                                                                                                    "finished")
    assert (runs["sweep-t2"].info.status, runs["sweep-t2"].data.tags["llmstack.trial_outcome"]) == ("KILLED",
                                                                                                    "stopped_early")
    assert runs["sweep"].data.tags[REGISTRY_VERSION_TAG] == "sweep@v1"
    assert runs["sweep"].data.metrics["final.best_rank"] == 4


def test_distill_and_sweep_configs_take_a_tracking_section() -> None:
    from llmstack.finetune.configs import DistillConfig, SweepConfig

    distill = load_config(DistillConfig, {"tracking": {"mlflow_uri": "/tmp/mlruns", "experiment": "kd"}})
    sweep = load_config(SweepConfig, {"finetune": {"tracking": {"mlflow_uri": "/tmp/mlruns"}}})
    assert (distill.tracking.mlflow_uri, distill.tracking.experiment) == ("/tmp/mlruns", "kd")
    assert sweep.finetune.tracking.mlflow_uri == "/tmp/mlruns"
