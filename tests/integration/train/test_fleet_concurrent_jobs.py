"""Two tiny training jobs submitted at once as Ray Jobs to one real autoscaling cluster that has no worker node
up: the autoscaler adds a node for each job's demand, both finish and register their models, and each job's
metrics hold its worker-seconds, busy worker-seconds and queue wait. A third job, whose worker no node type can
hold, fails at its start naming what it asked and what the node types offer.

The cluster is :func:`llmstack.fleet.local_cluster.local_autoscaling_cluster` (Ray's v1 autoscaler over its fake
multi-node provider, in its own process group): this process never calls ``ray.init``, so it runs beside the
session's shared cluster.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from llmstack.fleet.local_cluster import driver_env, local_autoscaling_cluster, worker_nodes

pytestmark = [pytest.mark.slow, pytest.mark.own_cluster]  # `make test-fleet` (kept out of `make test`)

MAX_STEPS = 6
CONFIG: dict[str, Any] = {
    "kind": "train",
    "data": {"max_documents": 200, "vocab_size": 512, "block_size": 64},
    "training": {"max_steps": MAX_STEPS, "micro_batch_size": 2, "warmup_steps": 1, "eval_every": MAX_STEPS,
                 "eval_batches": 1, "checkpoint_every": MAX_STEPS},
    "scaling": {"num_workers": 1, "cpus_per_worker": 1},
}


def test_two_jobs_share_an_autoscaling_cluster_that_grows_for_them(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from llmstack.fleet.jobs import autoscaler_adds_nodes, connect, job_logs, job_status, submit_job
    from llmstack.registry import Registry

    registry = tmp_path / "registry"
    env = driver_env()
    for key, value in env.items():
        if key.startswith("RAY_"):
            monkeypatch.setenv(key, value)
    # A head without CPUs and no worker node kept up: every worker needs a node the autoscaler adds.
    with local_autoscaling_cluster(min_nodes=0, max_nodes=2, cpus_per_node=1, env=env) as cluster:
        monkeypatch.setenv("RAY_ADDRESS", cluster.dashboard)
        deadline = time.monotonic() + 60
        while not autoscaler_adds_nodes(connect()):  # its first report names the node types
            assert time.monotonic() < deadline, "the autoscaler never reported"
            time.sleep(0.5)
        assert worker_nodes(cluster.dashboard) == []

        common = {"registry": str(registry), "overrides": [f"storage_path={tmp_path / 'runs'}"],
                  "env": {"LLMSTACK_STEP_DELAY_S": "0.5"}}  # a few seconds of steps: the two runs overlap
        jobs = {name: submit_job({**CONFIG, "name": name}, **common) for name in ("fleet-a", "fleet-b")}
        too_big = submit_job({**CONFIG, "name": "fleet-too-big"}, registry=str(registry),
                             overrides=["scaling.cpus_per_worker=2"])

        most_nodes, deadline, records = 0, time.monotonic() + 300, {}
        while len(records) < 3:
            with contextlib.suppress(requests.RequestException, KeyError, ValueError):
                most_nodes = max(most_nodes, len(worker_nodes(cluster.dashboard)))
            for job_id in [*jobs.values(), too_big]:
                record = job_status(job_id)
                if record.status in ("SUCCEEDED", "FAILED", "STOPPED"):
                    records[job_id] = record
            assert time.monotonic() < deadline, {j: job_status(j).status for j in [*jobs.values(), too_big]}
            time.sleep(1)
        logs = {job_id: job_logs(job_id) for job_id in records}
        for job_id, text in logs.items():  # shown when the test fails
            print(f"----- {job_id} {records[job_id].status}\n{text[-6000:]}")

    for name, job_id in jobs.items():
        assert records[job_id].status == "SUCCEEDED", logs[job_id][-3000:]
        assert records[job_id].registered == f"{name}@v1"
    assert most_nodes == 2  # one node added per job: they ran side by side

    assert records[too_big].status == "FAILED"
    assert "can never run on this autoscaling cluster: one worker asks for CPU 2" in logs[too_big], logs[too_big]
    assert "cpu1 (CPU 1; up to 2 nodes)" in logs[too_big]

    for name, job_id in jobs.items():
        metrics = Registry(str(registry)).manifest(f"{name}@v1").metrics
        assert metrics["step"] == MAX_STEPS
        assert 0 < metrics["busy_worker_seconds"] < metrics["worker_seconds"]
        # Queue wait: from the submission to the first worker group, which waited for a node to be added.
        assert 0 < metrics["queue_wait_s"] < records[job_id].end_time - records[job_id].submitted_at
