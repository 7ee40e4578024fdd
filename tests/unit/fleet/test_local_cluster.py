"""llmstack.fleet.local_cluster without Ray: losing a fake node kills its raylet and everything it started."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from llmstack.fleet.local_cluster import kill_raylet

# A stand-in raylet: a process named "raylet" (as the kernel reports it) whose command line names the session
# directory and the node id, with one child standing in for a Ray worker it started.
FAKE_RAYLET = ("import ctypes, subprocess, sys, time; ctypes.CDLL(None).prctl(15, b'raylet', 0, 0, 0); "
               "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); time.sleep(120)")


def start_fake_raylet(session_dir: Path, node_id: str) -> tuple[subprocess.Popen, psutil.Process]:
    raylet = subprocess.Popen([sys.executable, "-c", FAKE_RAYLET, f"--session_dir={session_dir}",
                               f"--node_id={node_id}"])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        process = psutil.Process(raylet.pid)
        if process.name() == "raylet" and process.children():
            return raylet, process.children()[0]
        time.sleep(0.1)
    raylet.kill()
    pytest.fail("the stand-in raylet did not start its child within 30 s")


def test_killing_a_node_takes_its_raylet_and_the_processes_it_started(tmp_path: Path) -> None:
    raylet, worker = start_fake_raylet(tmp_path, "node-a")
    other, other_worker = start_fake_raylet(tmp_path, "node-b")
    try:
        assert kill_raylet("node-a", str(tmp_path)) == raylet.pid
        assert raylet.wait(timeout=10) == -9
        worker.wait(timeout=10)  # gone too, as on a machine that died
        assert other.poll() is None and other_worker.is_running()  # the other node is untouched
        with pytest.raises(LookupError, match="node-c"):
            kill_raylet("node-c", str(tmp_path))
    finally:
        for process in (raylet, other):
            if process.poll() is None:
                process.kill()
        for child in (worker, other_worker):
            if child.is_running():
                child.kill()
