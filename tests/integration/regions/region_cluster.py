"""The multi-region tests' HTTP load and logging; the cluster itself is ``llmstack.serve._region_cluster``.

Used by the multi-region driver (run as a subprocess by the integration test).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from llmstack.serve.loadgen import ClosedLoop


def log(msg: str) -> None:
    print(f"[regions {time.strftime('%H:%M:%S')}] {msg}", flush=True)


@dataclass
class Sample:
    sent: float
    done: float
    status: int
    region: str | None
    retried: bool
    stream: bool
    cost: float | None = None


@dataclass
class Load(ClosedLoop):
    """``threads`` closed-loop clients (``stream_threads`` of them streaming) until stopped."""

    url: str
    model: str
    threads: int = 3
    stream_threads: int = 0
    max_tokens: int = 8
    samples: list[Sample] = field(default_factory=list)

    def one(self, session: Any, n: int, stream: bool) -> Sample:
        import requests

        body = {"model": self.model, "prompt": f"line {n % 60}:", "max_tokens": self.max_tokens,
                "temperature": 0.0, "stream": stream}
        sent = time.time()
        try:
            r = session.post(self.url + "/v1/completions", json=body, timeout=60, stream=stream)
            status = r.status_code
            if stream and status == 200:
                text = r.text  # the whole event stream; an error after the start shows as an error event
                if "data: [DONE]" not in text or '"error"' in text:
                    status = 599
            cost = r.headers.get("x-llmstack-cost-usd")
            return Sample(sent, time.time(), status, r.headers.get("x-llmstack-region"),
                          r.headers.get("x-llmstack-retried") == "1", stream, float(cost) if cost else None)
        except requests.RequestException:
            return Sample(sent, time.time(), 0, None, False, stream)

    def next_sample(self, session: Any, worker: int, n: int) -> Sample:
        return self.one(session, worker * 1000 + n, worker < self.stream_threads)


