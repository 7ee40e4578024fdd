"""llmstack.fleet.local_cluster without Ray: losing a fake node kills its raylet and everything it started."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from llmstack.fleet.local_cluster import CLUSTER_MARKER_ENV, NODE_ID_ENV, kill_raylet

# A stand-in raylet: a process named "raylet" (as the kernel reports it) whose command line names the session
# directory and the node id, with one child standing in for a Ray worker it started.
FAKE_RAYLET = ("import ctypes, subprocess, sys, time; ctypes.CDLL(None).prctl(15, b'raylet', 0, 0, 0); "
               "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); time.sleep(120)")
SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]


def start_fake_raylet(session_dir: Path, node_id: str) -> tuple[subprocess.Popen, psutil.Process]:
    raylet = subprocess.Popen([sys.executable, "-c", FAKE_RAYLET, f"--session_dir={session_dir}"],
                              env={**os.environ, NODE_ID_ENV: node_id, CLUSTER_MARKER_ENV: str(session_dir)})
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
    # A process of node-a that is not the raylet's child (a worker started through another process), and one
    # with the same node id from another cluster.
    detached = subprocess.Popen(SLEEPER, env={**os.environ, NODE_ID_ENV: "node-a", CLUSTER_MARKER_ENV: str(tmp_path)})
    foreign = subprocess.Popen(SLEEPER, env={**os.environ, NODE_ID_ENV: "node-a", CLUSTER_MARKER_ENV: "/elsewhere"})
    try:
        killed = kill_raylet("node-a", str(tmp_path))
        assert killed[0] == raylet.pid and set(killed) == {raylet.pid, worker.pid, detached.pid}
        assert raylet.wait(timeout=10) == -9 and detached.wait(timeout=10) == -9
        worker.wait(timeout=10)  # gone too, as on a machine that died
        assert other.poll() is None and other_worker.is_running() and foreign.poll() is None  # untouched
        with pytest.raises(LookupError, match="node-c"):
            kill_raylet("node-c", str(tmp_path))
    finally:
        for process in (raylet, other, detached, foreign):
            if process.poll() is None:
                process.kill()
                process.wait()
        for child in (worker, other_worker):
            if child.is_running():
                child.kill()
