"""A closed-loop HTTP load against a served app, shared by the integration tests and the benchmarks.

``threads`` client threads, each sending its next request as soon as the last one ended (``pause_s``
apart), until stopped or until each has sent ``requests_each``. :class:`ClosedLoop` is the loop alone
(subclasses say what one request is); :class:`CompletionLoad` is the loop posting ``/v1/completions``
and recording a :class:`CompletionSample` per request, with the headers the routers add.

May import: the standard library and ``requests`` (lazily). Nothing else of llmstack, no Ray.

Example:
    >>> with CompletionLoad("http://127.0.0.1:8000", threads=2) as load:  # doctest: +SKIP
    ...     time.sleep(5)
    >>> summarize(load.samples, seconds=5)["rps"]  # doctest: +SKIP
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

VERSION_HEADER = "x-llmstack-version"
REGION_HEADER = "x-llmstack-region"
RETRIED_HEADER = "x-llmstack-retried"
COST_HEADER = "x-llmstack-cost-usd"


class ClosedLoop:
    """Mixin for a dataclass with ``threads`` and ``samples``: ``with load:`` (or ``start()`` ... ``stop()``)
    runs the clients, each calling :meth:`next_sample` and appending its result to ``samples``.

    ``requests_each`` (None: no limit) ends each client after that many requests; :meth:`wait` joins them.
    """

    threads: int
    samples: list[Any]
    pause_s: float = 0.0
    requests_each: int | None = None

    def next_sample(self, session: Any, worker: int, n: int) -> Any:
        """One request of client ``worker`` (its ``n``-th, from 1), as the sample to record."""
        raise NotImplementedError

    def _run(self, worker: int) -> None:
        import requests

        session = requests.Session()
        n = 0
        while not self._stop.is_set() and (self.requests_each is None or n < self.requests_each):
            n += 1
            self.samples.append(self.next_sample(session, worker, n))
            if self.pause_s:
                time.sleep(self.pause_s)

    def start(self) -> Any:
        self._stop = threading.Event()
        self._workers = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(self.threads)]
        for t in self._workers:
            t.start()
        return self

    def wait(self, timeout: float | None = None) -> None:
        """Join the clients (they end by themselves only with ``requests_each``)."""
        for t in self._workers:
            t.join(timeout=timeout)

    def stop(self) -> None:
        self._stop.set()
        self.wait(timeout=90)

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


@dataclass
class CompletionSample:
    """One ``/v1/completions`` request: wall times it was sent and answered, status (0: no HTTP response),
    and what the answer said. ``tokens`` counts completion tokens (stream: text events)."""

    sent: float
    done: float
    status: int
    stream: bool = False
    text: str | None = None
    tokens: int = 0
    ttft: float | None = None  # seconds from sending to the first text event (stream only)
    version: str | None = None  # the headers set by the canary and region routers
    region: str | None = None
    retried: bool = False
    cost: float | None = None
    error_code: str | None = None  # the OpenAI error code of a failure, when it had one
    body: Any = None  # the parsed JSON answer (not streamed)

    @property
    def latency(self) -> float:
        return self.done - self.sent


DONE = None  # what :func:`sse_events` yields for ``data: [DONE]``


def sse_events(response: Any) -> Iterator[dict[str, Any] | None]:
    """The JSON events of a streamed (``stream=True``) ``requests`` response, each as it arrives; :data:`DONE`
    for ``data: [DONE]``."""
    import json

    for line in response.iter_lines(chunk_size=None, decode_unicode=True):  # unbuffered: each event on arrival
        if line and line.startswith("data: "):
            yield DONE if line == "data: [DONE]" else json.loads(line[len("data: "):])


def post_completion(session: Any, url: str, body: dict[str, Any], *, timeout: float = 60) -> CompletionSample:
    """POST ``body`` to ``url``/v1/completions and record the answer (``body["stream"]`` streams it)."""
    import requests

    stream = bool(body.get("stream"))
    sent = time.time()
    try:
        r = session.post(url + "/v1/completions", json=body, timeout=timeout, stream=stream)
        sample = CompletionSample(sent, sent, r.status_code, stream, version=r.headers.get(VERSION_HEADER),
                                  region=r.headers.get(REGION_HEADER), retried=r.headers.get(RETRIED_HEADER) == "1")
        cost = r.headers.get(COST_HEADER)
        sample.cost = float(cost) if cost else None
        if stream and r.status_code == 200:
            parts, finished = [], False
            for event in sse_events(r):
                if event is DONE:
                    finished = True
                elif "error" in event:
                    sample.status = 599  # an error after the stream started
                elif event.get("choices") and event["choices"][0].get("text") is not None:
                    if sample.ttft is None:
                        sample.ttft = time.time() - sent
                    parts.append(event["choices"][0]["text"])
            sample.text, sample.tokens = "".join(parts), len(parts)
            if not finished:
                sample.status = 599
        else:
            try:
                sample.body = r.json()
            except ValueError:
                sample.body = None
            if r.status_code == 200 and isinstance(sample.body, dict) and sample.body.get("choices"):
                sample.text = sample.body["choices"][0].get("text")
                sample.tokens = (sample.body.get("usage") or {}).get("completion_tokens", 0)
            elif isinstance(sample.body, dict) and isinstance(sample.body.get("error"), dict):
                sample.error_code = sample.body["error"].get("code")
        sample.done = time.time()
        return sample
    except requests.RequestException:
        return CompletionSample(sent, time.time(), 0, stream)


def line_prompt(worker: int, n: int) -> str:
    """The default prompt: one of 60 short lines, spread over the clients."""
    return f"line {(worker * 31 + n) % 60}:"


@dataclass
class CompletionLoad(ClosedLoop):
    """``threads`` clients posting completions back to back (the first ``stream_threads`` of them streaming).

    ``prompt(worker, n)`` picks each prompt; ``extra`` goes into every body (``model``, ``ignore_eos``, ...).
    """

    url: str
    threads: int = 4
    max_tokens: int = 8
    temperature: float = 0.0
    stream_threads: int = 0
    pause_s: float = 0.0
    requests_each: int | None = None
    prompt: Callable[[int, int], str] = line_prompt
    extra: dict[str, Any] = field(default_factory=dict)
    timeout_s: float = 60
    samples: list[CompletionSample] = field(default_factory=list)

    def body(self, worker: int, n: int) -> dict[str, Any]:
        return {"prompt": self.prompt(worker, n), "max_tokens": self.max_tokens, "temperature": self.temperature,
                "stream": worker < self.stream_threads, **self.extra}

    def next_sample(self, session: Any, worker: int, n: int) -> CompletionSample:
        sample = post_completion(session, self.url, self.body(worker, n), timeout=self.timeout_s)
        if sample.status == 0:
            session.close()  # drop the pooled connection that failed; the session opens a new one
        return sample

    def failed(self) -> list[CompletionSample]:
        return [s for s in list(self.samples) if s.status != 200]


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile by nearest rank (nan for no values)."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def summarize(samples: list[CompletionSample], seconds: float) -> dict[str, float]:
    """Requests, failures, answered requests per second and p50/p95 latency (ms) of ``seconds`` of load."""
    ok = [s for s in samples if s.status == 200]
    latencies = [s.latency for s in ok]
    return {"requests": len(samples), "failed": len(samples) - len(ok), "rps": len(ok) / seconds,
            "p50_ms": 1000 * percentile(latencies, 50), "p95_ms": 1000 * percentile(latencies, 95)}
