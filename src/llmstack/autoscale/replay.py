"""Replay a trace against a running OpenAI-compatible app over HTTP, at the recorded arrival times.

Each request is a streamed ``/v1/completions`` call whose prompt is token ids of the recorded context
length (clipped to the model's window; the clipping is reported) asking for the recorded output length
(``max_tokens``, plus the ``min_tokens``/``ignore_eos`` extensions for servers that honour them). The
client records TTFT (first streamed token), latency, status and output tokens per request and, with a
``replica_probe``, the replica count every second. It is bounded: ``max_requests``, ``max_duration_s``
(whatever is still running then is cancelled and recorded as status 0) and a per-request timeout.

Example:
    >>> result = replay(trace.window(duration_s=60), "http://127.0.0.1:8000", speedup=4)  # doctest: +SKIP
    >>> result.metrics["slo_attainment"], result.metrics["replica_seconds"]  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmstack.autoscale.trace import Trace
from llmstack.errors import LLMStackError

PROMPT_TOKEN_LOW, PROMPT_TOKEN_SPAN = 10, 200  # prompt ids stay inside any vocabulary of >= 210 tokens


class ReplayError(LLMStackError):
    """The replay target does not answer, or answered something that is not the OpenAI API."""


@dataclasses.dataclass
class ReplayResult:
    """Per-request records, the replica timeline and summary metrics of one replay."""

    url: str
    model: str
    speedup: float
    records: list[dict[str, Any]]
    replicas: list[tuple[float, int]]  # (seconds since start, running replicas)
    metrics: dict[str, Any]

    def to_json(self, path: str | Path) -> Path:
        """Write the whole result as JSON."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dataclasses.asdict(self), indent=1), encoding="utf-8")
        return path


def replay(trace: Trace, url: str, *, model: str | None = None, speedup: float = 1.0,
           ttft_slo_s: float = 1.0, max_requests: int | None = 2000, max_duration_s: float = 600.0,
           request_timeout_s: float = 60.0, max_output_tokens: int = 256, api_key: str | None = None,
           replica_probe: Callable[[], int | None] | None = None, probe_interval_s: float = 1.0,
           progress: bool = True) -> ReplayResult:
    """Send ``trace``'s requests to ``url`` at their arrival times divided by ``speedup``.

    Args:
        trace: the requests; windowing is the caller's (``trace.window(...)``).
        url: base URL of the app (``http://host:port[/prefix]``).
        model: served model id; None: the first of ``/v1/models``.
        ttft_slo_s: the SLO that ``slo_attainment`` counts against.
        max_requests, max_duration_s, request_timeout_s: the bounds of the run.
        replica_probe: returns the running replica count (e.g. :func:`serve_replica_probe`).

    Raises:
        ReplayError: the URL does not answer or is not an OpenAI-compatible API.
    """
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    base = url.rstrip("/")
    model_id, window = _model_info(base, model, headers)
    shaped = trace.window(max_requests=max_requests) if max_requests else trace
    shaped = shaped.compressed(speedup).clipped(context_window=window, max_output_tokens=max_output_tokens)
    replicas: list[tuple[float, int]] = []
    stop = threading.Event()
    start = time.perf_counter()
    prober = None
    if replica_probe is not None:
        prober = threading.Thread(target=_probe_loop, args=(replica_probe, replicas, start, probe_interval_s, stop),
                                  daemon=True)
        prober.start()
    try:
        records = asyncio.run(_send_all(httpx, shaped, base, model_id, headers, start, max_duration_s,
                                        request_timeout_s, progress))
    finally:
        stop.set()
        if prober is not None:
            prober.join(timeout=5)
    metrics = summarize(records, replicas, ttft_slo_s=ttft_slo_s)
    metrics.update(clipped_context=shaped.clipped_context, clipped_output=shaped.clipped_generated,
                   context_window=window, speedup=speedup)
    return ReplayResult(url=base, model=model_id, speedup=speedup, records=records, replicas=replicas,
                        metrics=metrics)


def serve_replica_probe(app_name: str, deployment: str = "LLMServer", *,
                        include_starting: bool = False) -> Callable[[], int | None]:
    """A probe that reads the running (or, with ``include_starting``, also starting) replicas of
    ``app_name``'s ``deployment`` from Serve's status. Needs ``ray.init`` in this process.
    """
    states = ("RUNNING", "STARTING") if include_starting else ("RUNNING",)

    def probe() -> int | None:
        from ray import serve

        app = serve.status().applications.get(app_name)
        if app is None or deployment not in app.deployments:
            return None
        counts = app.deployments[deployment].replica_states
        return int(sum(counts.get(state, 0) for state in states))

    return probe


def summarize(records: list[dict[str, Any]], replicas: list[tuple[float, int]], *,
              ttft_slo_s: float) -> dict[str, Any]:
    """SLO attainment, TTFT/latency percentiles and replica-seconds of a replay."""
    ok = [r for r in records if r["status"] == 200]
    ttfts = sorted(r["ttft_s"] for r in ok if r["ttft_s"] is not None)
    latencies = sorted(r["latency_s"] for r in ok if r["latency_s"] is not None)
    met = sum(1 for r in ok if r["ttft_s"] is not None and r["ttft_s"] <= ttft_slo_s)
    short = sum(1 for r in ok if r["completion_tokens"] is not None and r["completion_tokens"] < r["output_tokens"])
    replica_seconds = sum((t1 - t0) * n for (t0, n), (t1, _) in zip(replicas, replicas[1:]))
    statuses: dict[str, int] = {}
    for r in records:
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
    return {
        "requests": len(records),
        "ok": len(ok),
        "statuses": statuses,
        "slo_attainment": round(met / len(records), 5) if records else 1.0,
        "slo_misses": len(records) - met,
        "ttft_slo_s": ttft_slo_s,
        "ttft_p50_s": _nearest_rank(ttfts, 0.5),
        "ttft_p99_s": _nearest_rank(ttfts, 0.99),
        "latency_p50_s": _nearest_rank(latencies, 0.5),
        "latency_p99_s": _nearest_rank(latencies, 0.99),
        "outputs_shorter_than_asked": short,
        "replica_seconds": round(replica_seconds, 2),
        "peak_replicas": max((n for _, n in replicas), default=None),
    }


def _nearest_rank(ordered: list[float], q: float) -> float | None:
    return round(ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))], 4) if ordered else None


def _model_info(base: str, model: str | None, headers: dict[str, str]) -> tuple[str, int]:
    import httpx

    try:
        response = httpx.get(base + "/v1/models", headers=headers, timeout=10.0)
    except httpx.HTTPError as exc:
        raise ReplayError(f"replay target {base} does not answer ({type(exc).__name__}: {exc})") from None
    if response.status_code != 200:
        raise ReplayError(f"replay target {base}/v1/models answered HTTP {response.status_code}: "
                          f"{response.text[:200]}")
    try:
        cards = response.json()["data"]
    except (ValueError, KeyError, TypeError):
        raise ReplayError(f"replay target {base}/v1/models is not an OpenAI model list") from None
    if not cards:
        raise ReplayError(f"replay target {base} serves no models")
    card = next((c for c in cards if c.get("id") == model), None) if model else cards[0]
    if card is None:
        raise ReplayError(f"model {model!r} is not served at {base}; served: {', '.join(c['id'] for c in cards)}")
    return card["id"], int(card.get("max_model_len") or 2048)


def _probe_loop(probe: Callable[[], int | None], out: list[tuple[float, int]], start: float,
                interval_s: float, stop: threading.Event) -> None:
    while True:
        try:
            count = probe()
        except Exception:  # a probe hiccup leaves a gap, never ends the replay
            count = None
        if count is not None:
            out.append((round(time.perf_counter() - start, 3), count))
        if stop.wait(interval_s):
            break
    try:
        count = probe()
        if count is not None:
            out.append((round(time.perf_counter() - start, 3), count))
    except Exception:
        pass


async def _send_all(httpx: Any, trace: Trace, base: str, model: str, headers: dict[str, str], start: float,
                    max_duration_s: float, request_timeout_s: float, progress: bool) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = [
        {"index": i, "arrival_s": t, "sent_s": None, "ttft_s": None, "latency_s": None, "status": 0,
         "prompt_tokens": c, "output_tokens": g, "completion_tokens": None}
        for i, (t, c, g) in enumerate(zip(trace.arrival_s, trace.context_tokens, trace.generated_tokens))]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(records), desc="replay", unit="req", leave=False)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    timeout = httpx.Timeout(request_timeout_s, connect=10.0)
    async with httpx.AsyncClient(base_url=base, headers=headers, limits=limits, timeout=timeout) as client:
        tasks = [asyncio.ensure_future(_one(client, model, rec, start, request_timeout_s, bar)) for rec in records]
        deadline = max(0.0, max_duration_s - (time.perf_counter() - start))
        done, pending = await asyncio.wait(tasks, timeout=deadline)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    if bar is not None:
        bar.close()
    return records


async def _one(client: Any, model: str, rec: dict[str, Any], start: float, timeout_s: float, bar: Any) -> None:
    delay = rec["arrival_s"] - (time.perf_counter() - start)
    if delay > 0:
        await asyncio.sleep(delay)
    sent = time.perf_counter()
    rec["sent_s"] = round(sent - start, 4)
    offset = rec["index"] * 7
    prompt = [PROMPT_TOKEN_LOW + (offset + j * 13) % PROMPT_TOKEN_SPAN for j in range(rec["prompt_tokens"])]
    body = {"model": model, "prompt": prompt, "max_tokens": rec["output_tokens"], "stream": True,
            "temperature": 1.0, "min_tokens": rec["output_tokens"], "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    try:
        async with asyncio.timeout(timeout_s):
            async with client.stream("POST", "/v1/completions", json=body) as response:
                rec["status"] = response.status_code
                if response.status_code != 200:
                    await response.aread()
                else:
                    async for line in response.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        event = json.loads(line[6:])
                        if "error" in event:
                            rec["status"] = int(event["error"].get("code") or 500) if str(
                                event["error"].get("code", "")).isdigit() else 500
                            break
                        if rec["ttft_s"] is None and any(c.get("text") for c in event.get("choices", [])):
                            rec["ttft_s"] = round(time.perf_counter() - sent, 4)
                        if event.get("usage"):
                            rec["completion_tokens"] = event["usage"].get("completion_tokens")
        rec["latency_s"] = round(time.perf_counter() - sent, 4)
    except (TimeoutError, asyncio.TimeoutError):
        rec["status"] = 504
    except asyncio.CancelledError:
        rec["status"] = 0
        raise
    except Exception as exc:  # connection refused/reset mid-run: recorded, the replay goes on
        rec["status"] = 599
        rec["error"] = f"{type(exc).__name__}: {exc}"[:200]
    finally:
        if bar is not None:
            bar.update(1)
