"""The environment a benchmark runs in: quiet offline defaults, a description of the machine, free ports."""

from __future__ import annotations

import os
import platform
import socket
from pathlib import Path

QUIET_DEFAULTS = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}  # Ray workers of a bench's cluster


def apply_quiet_defaults() -> None:
    """Offline and quiet for every benchmark (and the processes it starts), unless the caller says otherwise."""
    for key, value in QUIET_DEFAULTS.items():
        os.environ.setdefault(key, value)


def cpu_name() -> str:
    """The CPU model name (``/proc/cpuinfo``), or what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages, rounded to 0.1 (None where the OS has none)."""
    try:
        return [round(x, 1) for x in os.getloadavg()]
    except OSError:
        return None


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
