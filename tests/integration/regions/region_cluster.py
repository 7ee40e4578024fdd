"""The multi-region tests' HTTP load and logging; the cluster itself is ``llmstack.serve._region_cluster``.

Used by the multi-region driver (run as a subprocess by the integration test).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from llmstack.serve.loadgen import DONE, ClosedLoop, sse_events


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
    prompt: str = ""
    text: str | None = None  # the answer's text (a stream's events joined)


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

        prompt = f"line {n % 60}:"
        body = {"model": self.model, "prompt": prompt, "max_tokens": self.max_tokens, "temperature": 0.0,
                "stream": stream}
        sent = time.time()
        try:
            r = session.post(self.url + "/v1/completions", json=body, timeout=60, stream=stream)
            status, text = r.status_code, None
            if stream and status == 200:
                events = list(sse_events(r))  # an error after the start shows as an error event
                if DONE not in events or any("error" in e for e in events if e is not DONE):
                    status = 599
                text = "".join(e["choices"][0]["text"] for e in events if e is not DONE and e.get("choices"))
            elif status == 200:
                text = r.json()["choices"][0]["text"]
            cost = r.headers.get("x-llmstack-cost-usd")
            return Sample(sent, time.time(), status, r.headers.get("x-llmstack-region"),
                          r.headers.get("x-llmstack-retried") == "1", stream, float(cost) if cost else None,
                          prompt, text)
        except requests.RequestException:
            return Sample(sent, time.time(), 0, None, False, stream, prompt=prompt)

    def next_sample(self, session: Any, worker: int, n: int) -> Sample:
        return self.one(session, worker * 1000 + n, worker < self.stream_threads)


