"""A steady HTTP load from a local client, recording which version answered each request."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import requests

from llmstack.serve._testing import wait_healthy  # noqa: F401 - the canary tests import it from here
from llmstack.serve.loadgen import ClosedLoop

VERSION_HEADER = "x-llmstack-version"




@dataclass
class Sample:
    sent: float
    done: float
    status: int
    version: str | None
    text: str | None


@dataclass
class Load(ClosedLoop):
    """``threads`` clients posting completions back to back until stopped (``pause_s`` apart)."""

    url: str
    threads: int = 4
    max_tokens: int = 8
    pause_s: float = 0.0
    samples: list[Sample] = field(default_factory=list)

    def next_sample(self, session: Any, worker: int, n: int) -> Sample:
        body = {"prompt": f"line {(worker * 31 + n) % 60}:", "max_tokens": self.max_tokens, "temperature": 0.8}
        sent = time.time()
        try:
            r = session.post(self.url + "/v1/completions", json=body, timeout=60)
            text = r.json()["choices"][0]["text"] if r.status_code == 200 else None
            return Sample(sent, time.time(), r.status_code, r.headers.get(VERSION_HEADER), text)
        except requests.RequestException:
            return Sample(sent, time.time(), 0, None, None)

    def failed(self) -> list[Sample]:
        return [s for s in list(self.samples) if s.status != 200]
