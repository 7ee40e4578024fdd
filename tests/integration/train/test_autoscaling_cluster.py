"""An elastic ``[1, 2]`` run on Ray's real autoscaler over fake local nodes: it starts on the one worker node up,
grows to two workers when the autoscaler adds a node for its demand, shrinks back to one when that node's raylet
is killed, and finishes having lost at most one checkpoint interval at each restart.

The cluster is :func:`llmstack.fleet.local_cluster.local_autoscaling_cluster` (Ray's v1 autoscaler over its fake
multi-node provider, on free ports, in its own process group): this process never calls ``ray.init``, it reads the
cluster through the dashboard's state API, so it runs beside the session's shared cluster.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from llmstack.fleet.local_cluster import (driver_env, kill_raylet, local_autoscaling_cluster, state, train_workers,
                                          worker_nodes)

pytestmark = [pytest.mark.slow, pytest.mark.own_cluster]  # `make test-fleet` (kept out of `make test`: ~3 min)

CHECKPOINT_EVERY = 5
MAX_STEPS = 100
CONFIG: dict[str, Any] = {
    "name": "elastic-lm",
    "data": {"max_documents": 200, "vocab_size": 512, "block_size": 64},
    "training": {"max_steps": MAX_STEPS, "micro_batch_size": 2, "warmup_steps": 1, "eval_every": MAX_STEPS,
                 "eval_batches": 1, "checkpoint_every": CHECKPOINT_EVERY},
    # Restarts (a resize or the lost node) are not failures, the killed workers are: room for a few.
    "scaling": {"num_workers": [1, 2], "max_failures": 3, "elastic_resize_interval_s": 3},
}


def read_history(run_dir: Path) -> list[dict[str, Any]]:
    """The run's metrics.jsonl as the driver last wrote it (every 10 s while it runs); [] before the first write."""
    records = []
    with contextlib.suppress(OSError):
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            with contextlib.suppress(ValueError):
                records.append(json.loads(line))
    return records


def two_or_none(workers: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    return workers if len(workers) == 2 else None


def wait_for(predicate: Any, what: str, *, timeout_s: float, driver: subprocess.Popen | None = None) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(requests.RequestException, KeyError, ValueError):
            value = predicate()
            if value:
                return value
        if driver is not None and driver.poll() is not None:
            pytest.fail(f"the training run ended (rc {driver.returncode}) before {what}")
        assert time.monotonic() < deadline, f"no {what} within {timeout_s:.0f} s"
        time.sleep(0.5)


def controller_errors(temp_dir: str) -> str:
    """What Ray Train's controller logged about a failed control-loop step (its traceback), from the session logs."""
    found = []
    for path in sorted(Path(temp_dir).glob("session_*/logs/*")):
        with contextlib.suppress(OSError):
            text = path.read_text(errors="replace")
            at = -1
            for needle in ("Error in control loop iteration", "ControllerError", "MetricsBus", "Traceback"):
                at = text.find(needle) if at < 0 else at
            if at >= 0:
                found.append(f"--- {path.name}\n{text[at:at + 6000]}")
    return "\n".join(found) or "(no controller error in the session logs)"


def test_elastic_run_grows_on_a_new_node_and_shrinks_on_a_lost_one(tmp_path: Path) -> None:
    registry, runs, mlruns = tmp_path / "registry", tmp_path / "runs", tmp_path / "mlruns"
    env = driver_env()
    config = tmp_path / "elastic.yaml"
    config.write_text(yaml.safe_dump({**CONFIG, "registry": str(registry), "storage_path": str(runs),
                                      "tracking": {"mlflow_uri": str(mlruns)}}))
    # A head with no CPUs (driver and Train controller only) and up to two 1-CPU worker nodes, one kept up.
    with local_autoscaling_cluster(min_nodes=1, max_nodes=2, env=env) as cluster:
        gcs_address, dashboard, temp_dir = cluster.gcs_address, cluster.dashboard, cluster.temp_dir
        assert len(worker_nodes(dashboard)) == 1  # min_workers: the one node up before any demand
        output = open(tmp_path / "driver.log", "w+")
        driver = subprocess.Popen([sys.executable, "-m", "llmstack", "train", "--config", str(config)],
                                  env={**env, "RAY_ADDRESS": gcs_address, "LLMSTACK_STEP_DELAY_S": "0.4"},
                                  stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for(lambda: len(train_workers(dashboard)) == 1, "first worker group", timeout_s=120, driver=driver)
            # The run asks for its max: the autoscaler adds a node, the run restarts on both at a checkpoint.
            pair = wait_for(lambda: two_or_none(train_workers(dashboard)), "growth to two workers", timeout_s=120,
                            driver=driver)
            assert len(worker_nodes(dashboard)) == 2
            # Lose the node once the pair trains (Ray Train 2.60 fails the whole run, not the group, when a node
            # dies while a worker group is still starting): a step of two workers is in the metrics file.
            wait_for(lambda: any(r.get("workers") == 2 for r in read_history(runs / "elastic-lm")),
                     "a step on two workers", timeout_s=90, driver=driver)
            pair = train_workers(dashboard)
            killed_node = pair[-1]["node_id"]
            kill_raylet(killed_node, temp_dir)
            wait_for(lambda: killed_node not in {n["node_id"] for n in worker_nodes(dashboard)},
                     "lost node marked dead", timeout_s=60, driver=driver)
            driver.wait(timeout=300)
        finally:
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)
            output.seek(0)
            log = output.read()
            output.close()
            print(log[-8000:])  # shown when the test fails
            print(controller_errors(temp_dir))
            with contextlib.suppress(Exception):  # where each actor of the run lived, and how it ended
                for actor in state(dashboard, "actors"):
                    if actor["class_name"] in ("MetricsBus", "RayTrainWorker", "TrainController"):
                        print("actor", actor["class_name"], actor["state"], actor["node_id"][-6:], actor.get("pid"))
                print("nodes", [(n["node_id"][-6:], n["state"], n["is_head_node"]) for n in state(dashboard, "nodes")])
    assert driver.returncode == 0, log[-4000:]
    assert "registered elastic-lm@v1" in log, log[-4000:]

    from llmstack.registry import Registry

    manifest = Registry(str(registry)).manifest("elastic-lm@v1")
    assert manifest.metrics["step"] == MAX_STEPS
    recoveries = manifest.extra["recoveries"]
    assert len(recoveries) >= 2, recoveries  # the resize to two, and the lost node
    # Each restart resumes from a checkpoint and loses at most one checkpoint interval: the loop trains past a
    # checkpoint only once Ray Train's controller has committed it, so the latest committed one is never more
    # than an interval behind the last step the lost workers reached.
    assert all(r["resumed_from_step"] % CHECKPOINT_EVERY == 0 for r in recoveries), recoveries
    assert all(r["steps_lost"] <= CHECKPOINT_EVERY for r in recoveries), recoveries
    assert 0 < manifest.metrics["busy_worker_seconds"] < manifest.metrics["worker_seconds"]

    # The final trajectory: one worker, then two, then one again after the node was lost.
    history = read_history(runs / "elastic-lm")
    assert [r["step"] for r in history] == list(range(1, MAX_STEPS + 1))
    sizes = [r["workers"] for r in history]
    changes = [size for i, size in enumerate(sizes) if i == 0 or size != sizes[i - 1]]
    assert changes[:3] == [1, 2, 1], changes
    # The global batch stays the full-size run's: accumulation doubles on one worker.
    assert {r["grad_accum_steps"] for r in history if r["workers"] == 1} == {2}
    assert {r["grad_accum_steps"] for r in history if r["workers"] == 2} == {1}

    # The same run in MLflow: per-step metrics and the version it registered.
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=str(mlruns))
    (run,) = client.search_runs([client.get_experiment_by_name("llmstack").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["llmstack.registry_version"] == "elastic-lm@v1"
    assert run.data.params["scaling.num_workers"] == "[1, 2]"
    logged_sizes = {m.value for m in client.get_metric_history(run.info.run_id, "workers")}
    assert logged_sizes == {1.0, 2.0}
    assert run.data.metrics["final.step"] == MAX_STEPS
