"""Progress lines: ``[tag HH:MM:SS] message``, flushed at once (benchmarks run for minutes, often piped)."""

from __future__ import annotations

import time
from collections.abc import Callable


def logger(tag: str | None = None) -> Callable[[str], None]:
    """A ``log(message)`` function printing ``[tag HH:MM:SS] message`` (``[HH:MM:SS] message`` with no tag)."""
    prefix = f"{tag} " if tag else ""

    def log(message: str) -> None:
        print(f"[{prefix}{time.strftime('%H:%M:%S')}] {message}", flush=True)

    return log
