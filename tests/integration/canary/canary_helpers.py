"""A steady HTTP load from a local client, recording which version answered each request."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import requests

VERSION_HEADER = "x-llmstack-version"


def wait_healthy(url: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if requests.get(url + "/health", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise AssertionError(f"{url} did not become healthy")


@dataclass
class Sample:
    sent: float
    done: float
    status: int
    version: str | None
    text: str | None


@dataclass
class Load:
    """``threads`` clients posting completions back to back until stopped (or ``rate`` requests/s each)."""

    url: str
    threads: int = 4
    max_tokens: int = 8
    pause_s: float = 0.0
    samples: list[Sample] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)

    def _run(self, i: int) -> None:
        session = requests.Session()
        n = 0
        while not self._stop.is_set():
            n += 1
            body = {"prompt": f"line {(i * 31 + n) % 60}:", "max_tokens": self.max_tokens, "temperature": 0.8}
            sent = time.time()
            try:
                r = session.post(self.url + "/v1/completions", json=body, timeout=60)
                text = r.json()["choices"][0]["text"] if r.status_code == 200 else None
                self.samples.append(Sample(sent, time.time(), r.status_code, r.headers.get(VERSION_HEADER), text))
            except requests.RequestException:
                self.samples.append(Sample(sent, time.time(), 0, None, None))
            if self.pause_s:
                time.sleep(self.pause_s)

    def __enter__(self) -> Load:
        for i in range(self.threads):
            t = threading.Thread(target=self._run, args=(i,), daemon=True)
            t.start()
            self._workers.append(t)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        for t in self._workers:
            t.join(timeout=90)

    def failed(self) -> list[Sample]:
        return [s for s in list(self.samples) if s.status != 200]
