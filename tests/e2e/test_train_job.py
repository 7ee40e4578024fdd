"""`llmstack train` from the command line: a user mistake, and `ray job submit` to a `ray start --head` cluster."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml

BIN = Path(sys.executable).parent
CONFIG = {
    "name": "job-lm",
    "data": {"max_documents": 200, "vocab_size": 512, "block_size": 64},
    "training": {"max_steps": 3, "micro_batch_size": 2, "warmup_steps": 1, "eval_every": 3, "eval_batches": 1,
                 "checkpoint_every": 3},
    "scaling": {"num_workers": 1},
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    # A private loopback cluster: no token auth (Ray turns it on when ~/.ray/auth_token exists).
    env.update({"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0",
                "RAY_AUTH_MODE": "disabled"}, **extra)
    return env


def test_cli_user_mistake_is_one_line_and_exit_2(tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    proc = subprocess.run([str(BIN / "llmstack"), "--registry", str(tmp_path / "reg"), "train", "--config", str(config),
                           "data.block_size=1024"], capture_output=True, text=True, timeout=120, env=_env())
    assert proc.returncode == 2, proc.stderr
    assert "data.block_size: 1024 tokens exceed the model's 256 positions" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


@pytest.fixture
def head_node():
    """A `ray start --head --block` cluster on free ports, stopped (only it) at the end."""
    temp_dir = tempfile.mkdtemp(prefix="rayjob-", dir="/tmp")  # short: Ray's socket paths have a length limit
    log = open(os.path.join(temp_dir, "head.log"), "wb")
    gcs, dashboard = _free_port(), _free_port()
    ports = ["--port", str(gcs), "--dashboard-port", str(dashboard), "--dashboard-host", "127.0.0.1",
             "--ray-client-server-port", str(_free_port()), "--dashboard-agent-listen-port", str(_free_port()),
             "--dashboard-agent-grpc-port", str(_free_port()), "--metrics-export-port", str(_free_port()),
             "--runtime-env-agent-port", str(_free_port())]
    head = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", "2",
                             "--object-store-memory", str(200 * 1024 * 1024), "--include-dashboard", "true",
                             "--temp-dir", temp_dir, "--disable-usage-stats", *ports],
                            env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            probe = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], capture_output=True,
                                   env=_env(), timeout=60)
            if probe.returncode == 0:
                break
            if head.poll() is not None:
                log.flush()
                pytest.fail("ray start --head exited: " + Path(log.name).read_text(errors="replace")[-2000:])
            time.sleep(2)
        else:
            pytest.fail("the Ray head node did not come up within 120 s")
        yield address
    finally:
        _signal_group(head.pid, signal.SIGTERM)  # --block: the head tears down the processes it started
        try:
            head.wait(timeout=15)
        except subprocess.TimeoutExpired:
            _signal_group(head.pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_ray_job_submit_llmstack_train(head_node, tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    registry = tmp_path / "registry"
    submission_id = f"job-lm-{uuid.uuid4().hex[:8]}"
    ray = [str(BIN / "ray"), "job"]
    # --no-wait, then poll: the log tail is a websocket proxied head -> agent, which a busy machine can drop
    # (close code 1006) while the job itself runs on; status and logs are plain HTTP requests.
    command = [*ray, "submit", "--address", head_node, "--submission-id", submission_id, "--no-wait", "--",
               str(BIN / "llmstack"), "--registry", str(registry), "train", "--config", str(config),
               f"storage_path={tmp_path / 'runs'}", "training.max_steps=3"]
    for _ in range(20):  # the job agent can lag the dashboard on a busy machine; nothing ran yet then
        proc = subprocess.run(command, capture_output=True, text=True, timeout=120, env=_env())
        if "No available agent to submit job" not in proc.stdout + proc.stderr:
            break
        time.sleep(3)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(head_node)
    deadline = time.monotonic() + 480
    while (status := client.get_job_status(submission_id)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED,
                                                                    JobStatus.STOPPED}:
        assert time.monotonic() < deadline, f"job still {status} after 480 s"
        time.sleep(2)
    output = subprocess.run([*ray, "logs", "--address", head_node, submission_id], capture_output=True, text=True,
                            timeout=60, env=_env()).stdout
    assert status == JobStatus.SUCCEEDED, output[-3000:]
    assert "registered job-lm@v1" in output
    from llmstack.registry import Registry

    manifest = Registry(str(registry)).manifest("job-lm@v1")
    assert manifest.kind == "model" and manifest.metrics["step"] == 3
    assert (tmp_path / "runs" / "job-lm" / "checkpoint_000003" / "model.safetensors").is_file()
