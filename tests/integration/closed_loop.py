"""A closed-loop HTTP load: ``threads`` client threads, each sending its next request as soon as the last one
ended, until stopped. The integration tests' load helpers (canary, regions) subclass it with their request.

Importable as ``closed_loop`` once ``tests/integration`` is on ``sys.path`` (the canary conftest and the
regions cluster helpers, which also run inside subprocess drivers and benchmarks, put it there).
"""

from __future__ import annotations

import threading
import time
from typing import Any


class ClosedLoop:
    """Mixin for a dataclass with ``threads`` and ``samples``: ``with load:`` runs the clients, each calling
    :meth:`next_sample` (``pause_s`` apart) and appending its result to ``samples``."""

    threads: int
    samples: list[Any]
    pause_s: float = 0.0

    def next_sample(self, session: Any, worker: int, n: int) -> Any:
        """One request of client ``worker`` (its ``n``-th, from 1), as the sample to record."""
        raise NotImplementedError

    def _run(self, worker: int) -> None:
        import requests

        session = requests.Session()
        n = 0
        while not self._stop.is_set():
            n += 1
            self.samples.append(self.next_sample(session, worker, n))
            if self.pause_s:
                time.sleep(self.pause_s)

    def __enter__(self) -> Any:
        self._stop = threading.Event()
        self._workers = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(self.threads)]
        for t in self._workers:
            t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        for t in self._workers:
            t.join(timeout=90)
