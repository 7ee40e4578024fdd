"""`llmstack train` from the command line: a user mistake, and the README's `ray job submit` recipe run as
written against a `ray start --head` cluster, with Ray's token authentication on and off."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
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

BIN = Path(sys.executable).parent
README = Path(__file__).resolve().parents[2] / "README.md"
CONFIG = {
    "name": "job-lm",
    "data": {"max_documents": 200, "vocab_size": 512, "block_size": 64},
    "training": {"max_steps": 3, "micro_batch_size": 2, "warmup_steps": 1, "eval_every": 3, "eval_batches": 1,
                 "checkpoint_every": 3},
    "scaling": {"num_workers": 1},
}
README_ADDRESS = "http://127.0.0.1:8265"


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


def readme_job_commands() -> list[str]:
    """The command lines of the README's "As a Ray job" block, trailing comments stripped."""
    text = README.read_text()
    section = text[text.index("**As a Ray job**"):]
    block = section[section.index("```bash\n") + len("```bash\n"):]
    block = block[:block.index("```")]
    return [re.sub(r"\s+#.*$", "", line).strip() for line in block.splitlines() if line.strip()]


def _commands_for(mode: str) -> list[str]:
    """The README's lines for ``mode``: as written for token auth; for ``disabled``, what the README says
    to do instead (its first two lines replaced by ``export RAY_AUTH_MODE=disabled``)."""
    lines = readme_job_commands()
    if mode == "token":
        return lines
    assert "replace the first two lines with `export RAY_AUTH_MODE=disabled`" in " ".join(README.read_text().split())
    return ["export RAY_AUTH_MODE=disabled", *lines[2:]]


def _clean_env(home: Path) -> dict[str, str]:
    """This process's environment without any Ray address or auth setting, in a fresh ``home``."""
    from llmstack.data.builtin import cache_root

    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env.update({"HOME": str(home), "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
                "LLMSTACK_CACHE": str(cache_root()),  # the built corpora, not rebuilt in the new HOME
                "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"})
    return env


@contextlib.contextmanager
def _head_node(start_line: str, env: dict[str, str]) -> Iterator[str]:
    """The README's ``ray start --head`` line on free ports with ``--block`` (so this test owns its
    process group), until the dashboard answers; only this cluster is stopped at the end."""
    temp_dir = tempfile.mkdtemp(prefix="rayjob-", dir="/tmp")  # short: Ray's socket paths have a length limit
    log = open(os.path.join(temp_dir, "head.log"), "wb")
    dashboard = _free_port()
    ports = ["--port", str(_free_port()), "--dashboard-port", str(dashboard), "--dashboard-host", "127.0.0.1",
             "--ray-client-server-port", str(_free_port()), "--dashboard-agent-listen-port", str(_free_port()),
             "--dashboard-agent-grpc-port", str(_free_port()), "--metrics-export-port", str(_free_port()),
             "--runtime-env-agent-port", str(_free_port())]
    # No drain on the SIGTERM that ends it: Ray's default waits up to 30 s for the node to drain first (the
    # group's GCS is going down with it), which outlasted the 15 s below and ended every run in SIGKILL.
    head = subprocess.Popen([*shlex.split(start_line), "--block", "--include-dashboard", "true",
                             "--temp-dir", temp_dir, "--disable-usage-stats", *ports],
                            env={**env, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(requests.RequestException):
                requests.get(address + "/api/version", timeout=5)  # any answer (200, or 401 with auth on)
                break
            if head.poll() is not None:
                log.flush()
                pytest.fail("ray start --head exited: " + Path(log.name).read_text(errors="replace")[-2000:])
            assert time.monotonic() < deadline, "the Ray head node did not come up within 120 s"
            time.sleep(0.25)
        yield address
    finally:
        _signal_group(head.pid, signal.SIGTERM)  # --block: the head tears down the processes it started
        try:
            head.wait(timeout=15)
        except subprocess.TimeoutExpired:
            _signal_group(head.pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_readme_job_block_is_the_recipe_this_file_runs() -> None:
    lines = readme_job_commands()
    assert lines[0] == "export RAY_AUTH_MODE=token" and lines[1].startswith("ray get-auth-token --generate")
    assert [line.split()[:3] for line in lines[2:]] == [["ray", "start", "--head"], ["ray", "job", "submit"]]
    assert f"--address {README_ADDRESS} -- llmstack train" in lines[3]


@pytest.mark.slow
@pytest.mark.parametrize("auth_mode", ["token", "disabled"])
def test_readme_ray_job_submit_llmstack_train(auth_mode: str, tmp_path: Path) -> None:
    """The README's lines in order, with free ports and a 3-step training run instead of 100 steps.

    ``token``: a HOME that already holds ``~/.ray/auth_token`` (what any earlier local ``ray.init()``
    leaves behind), where the README's bare ``ray job submit`` used to fail with AuthenticationError."""
    home = tmp_path / "home"
    token = f"{uuid.uuid4().hex}{uuid.uuid4().hex}"
    if auth_mode == "token":
        (home / ".ray").mkdir(parents=True)
        (home / ".ray" / "auth_token").write_text(token)
    else:
        home.mkdir()
    env = _clean_env(home)
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    registry = tmp_path / "registry"
    submission_id = f"job-lm-{uuid.uuid4().hex[:8]}"
    with contextlib.ExitStack() as stack:
        address = None
        for line in _commands_for(auth_mode):
            if line.startswith("export "):
                key, _, value = line.removeprefix("export ").partition("=")
                env[key] = value
            elif line.startswith("ray start --head"):
                address = stack.enter_context(_head_node(line, env))
            elif line.startswith("ray job submit"):
                assert address is not None, "the README submits before it starts a cluster"
                _submit(line, address, env, submission_id, tmp_path, registry, config)
            else:
                proc = subprocess.run(line, shell=True, env=env, capture_output=True, text=True, timeout=60)
                assert proc.returncode == 0, (line, proc.stderr)
        assert address is not None
        # Auth really is what the mode says: a request without the token is refused only with token auth.
        bare = requests.get(f"{address}/api/jobs/{submission_id}", timeout=10).status_code
        assert bare == (401 if auth_mode == "token" else 200)
        headers = {"Authorization": f"Bearer {token}"} if auth_mode == "token" else {}
        deadline = time.monotonic() + 480
        while (status := requests.get(f"{address}/api/jobs/{submission_id}", headers=headers,
                                      timeout=10).json()["status"]) not in {"SUCCEEDED", "FAILED", "STOPPED"}:
            assert time.monotonic() < deadline, f"job still {status} after 480 s"
            time.sleep(0.5)
        output = subprocess.run(["ray", "job", "logs", "--address", address, submission_id], capture_output=True,
                                text=True, timeout=60, env=env)
        assert status == "SUCCEEDED", (output.stdout + output.stderr)[-3000:]
        assert "registered job-lm@v1" in output.stdout, (output.stdout + output.stderr)[-3000:]
        # Quiet by default: the workers' and the controller's logs stay in Ray's files, whose folder is named.
        assert "Ray and Serve logs go to" in output.stdout, output.stdout[-3000:]
        assert not re.search(r"^\((RayTrainWorker|TrainController)\b", output.stdout, re.M), output.stdout[-3000:]
    if auth_mode == "token":
        assert (home / ".ray" / "auth_token").read_text() == token  # --generate kept the existing token
    from llmstack.registry import Registry

    manifest = Registry(str(registry)).manifest("job-lm@v1")
    assert manifest.kind == "model" and manifest.metrics["step"] == 3
    assert (tmp_path / "runs" / "job-lm" / "checkpoint_000003" / "model.safetensors").is_file()


def _submit(line: str, address: str, env: dict[str, str], submission_id: str, tmp_path: Path, registry: Path,
            config: Path) -> None:
    """The README's ``ray job submit`` line against ``address``; the entrypoint gets a private registry and
    a 3-step config appended (later overrides win), and ``--no-wait``: the log tail is a websocket proxied
    head -> agent, which a busy machine can drop (close code 1006) while the job runs on."""
    submit, entrypoint = line.split(" -- ", 1)
    assert README_ADDRESS in submit
    command = [*shlex.split(submit.replace(README_ADDRESS, address)), "--submission-id", submission_id,
               "--no-wait", "--", *shlex.split(entrypoint), "--registry", str(registry), "--config", str(config),
               f"storage_path={tmp_path / 'runs'}", "training.max_steps=3"]
    for _ in range(20):  # the job agent can lag the dashboard on a busy machine; nothing ran yet then
        proc = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
        if "No available agent to submit job" not in proc.stdout + proc.stderr:
            break
        time.sleep(3)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
