"""`llmstack jobs` against a real `ray start --head` cluster with Ray's token authentication on: a tiny
training job submitted from the CLI registers its version (with worker-seconds, busy worker-seconds and
queue wait in its metrics) and is listed, followed and logged; a second, long job is stopped; a job no
node can hold is refused at submit."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml

import llmstack
from llmstack._ray import free_ports
from llmstack.fleet.jobs import auth_headers

BIN = Path(sys.executable).parent
SRC = Path(llmstack.__file__).resolve().parents[1]  # the llmstack under test, also for the jobs' drivers
# Ports of this test's head node.
GCS_PORT, DASHBOARD_PORT, *_SPARE = free_ports(9)  # free now: clones of the suite may run side by side
OTHER_PORTS = dict(zip(("--ray-client-server-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                        "--metrics-export-port", "--runtime-env-agent-port", "--node-manager-port",
                        "--object-manager-port"), _SPARE))
CONFIG = {
    "kind": "train",
    "name": "jobs-lm",
    "data": {"max_documents": 200, "vocab_size": 512, "block_size": 64},
    "training": {"max_steps": 4, "micro_batch_size": 2, "warmup_steps": 1, "eval_every": 4, "eval_batches": 1,
                 "checkpoint_every": 2},
    "scaling": {"num_workers": 1},
}


def _env(home: Path, registry: Path) -> dict[str, str]:
    from llmstack.data.builtin import cache_root

    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env.update({"HOME": str(home), "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", "PYTHONPATH": str(SRC),
                "LLMSTACK_CACHE": str(cache_root()), "LLMSTACK_REGISTRY": str(registry), "RAY_AUTH_MODE": "token",
                "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"})
    return env


@contextlib.contextmanager
def head_node(env: dict[str, str]) -> Iterator[str]:
    """``ray start --head --block`` (2 CPUs, a small object store) until its dashboard answers."""
    temp_dir = tempfile.mkdtemp(prefix="rayjobs-", dir="/tmp")  # short: Ray's socket paths have a length limit
    log = open(os.path.join(temp_dir, "head.log"), "wb")
    ports = [str(x) for pair in OTHER_PORTS.items() for x in pair]
    head = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", "2",
                             "--object-store-memory", str(200 * 1024 * 1024), "--port", str(GCS_PORT),
                             "--dashboard-port", str(DASHBOARD_PORT), "--dashboard-host", "127.0.0.1",
                             "--include-dashboard", "true", "--temp-dir", temp_dir, "--disable-usage-stats", *ports],
                            env={**env, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"},  # see below
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{DASHBOARD_PORT}"
    try:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(requests.RequestException, KeyError, ValueError):
                nodes = requests.get(address + "/api/v0/nodes", headers=auth_headers(), timeout=5).json()
                if nodes["data"]["result"]["result"]:  # the head's raylet registered: jobs can run
                    break
            if head.poll() is not None:
                log.flush()
                pytest.fail("ray start --head exited: " + Path(log.name).read_text(errors="replace")[-2000:])
            assert time.monotonic() < deadline, "the Ray head node did not come up within 120 s"
            time.sleep(0.25)
        yield address
    finally:
        with contextlib.suppress(ProcessLookupError):
            # --block: the head tears down what it started; at once, as Ray's drain on SIGTERM (up to 30 s by
            # default, its GCS going down with it) is off above, instead of outlasting the 20 s below into SIGKILL
            os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(head.pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def llmstack_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmstack", *args], capture_output=True, text=True, env=env,
                          timeout=180)


@pytest.mark.slow
def test_jobs_submit_list_status_logs_stop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from llmstack.fleet import job_status, submit_job, wait_for_job

    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(uuid.uuid4().hex + uuid.uuid4().hex)
    registry = tmp_path / "registry"
    env = _env(home, registry)
    for key in [k for k in os.environ if k.startswith(("RAY_ADDRESS", "RAY_AUTH"))]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("HOME", str(home))  # this process's submit_job reads the same token
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    with head_node(env) as address:
        monkeypatch.setenv("RAY_ADDRESS", address)
        # A worker of 4 CPUs fits no node of this 2-CPU cluster: refused at submit, naming the resources.
        proc = llmstack_cli("jobs", "submit", "--config", str(config), "scaling.cpus_per_worker=4", env=env)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert "one worker needs CPU 4" in proc.stderr and "has CPU 2" in proc.stderr

        proc = llmstack_cli("--registry", str(registry), "jobs", "submit", "--config", str(config), "--address",
                            address, f"storage_path={tmp_path / 'runs'}", env=env)
        assert proc.returncode == 0, proc.stderr
        job_id = proc.stdout.strip()
        # The second job, from Python: long enough to be stopped while it runs.
        long_id = submit_job(config, overrides=["name=jobs-long", "training.max_steps=100000",
                                                f"storage_path={tmp_path / 'runs'}"], registry=str(registry))
        deadline = time.monotonic() + 240
        while job_status(long_id).status == "PENDING":
            assert time.monotonic() < deadline, "the second job never started"
            time.sleep(0.25)
        stop = llmstack_cli("jobs", "stop", long_id, env={**env, "RAY_ADDRESS": address})
        assert stop.returncode == 0 and "stop requested" in stop.stdout, stop.stderr

        record = wait_for_job(job_id, timeout_s=420, poll_s=0.5)
        logs = llmstack_cli("jobs", "logs", job_id, "--address", address, env=env)
        assert record.status == "SUCCEEDED", logs.stdout[-3000:]
        assert record.registered == "jobs-lm@v1" and "registered jobs-lm@v1" in logs.stdout
        status = llmstack_cli("jobs", "status", job_id, "--json", "--address", address, env=env)
        assert json.loads(status.stdout)["registered"] == "jobs-lm@v1", status.stderr
        assert wait_for_job(long_id, timeout_s=120, poll_s=0.5).status == "STOPPED"
        unknown = llmstack_cli("jobs", "status", "no-such-job", "--address", address, env=env)
        assert unknown.returncode == 2 and f"no job 'no-such-job' on the cluster at {address}" in unknown.stderr
        listing = llmstack_cli("jobs", "list", "--json", "--address", address, env=env)
        listed = {job["job_id"]: job for job in json.loads(listing.stdout)}
        assert listed[job_id]["status"] == "SUCCEEDED" and listed[long_id]["status"] == "STOPPED"
        assert listed[job_id]["kind"] == "train" and listed[long_id]["name"] == "jobs-long"

    from llmstack.registry import Registry

    manifest = Registry(str(registry)).manifest("jobs-lm@v1")
    assert manifest.kind == "model" and manifest.metrics["step"] == 4
    metrics = manifest.metrics
    assert 0 < metrics["busy_worker_seconds"] <= metrics["worker_seconds"]
    # Queue wait: from the submission to the first worker group, inside the job's lifetime.
    assert 0 < metrics["queue_wait_s"] < record.end_time - record.submitted_at
    assert not Registry(str(registry)).list("jobs-long")  # the stopped job registered nothing
