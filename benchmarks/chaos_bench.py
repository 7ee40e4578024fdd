"""Chaos benchmark: faults under steady HTTP load, and what each one costs (issues #12 and #26).

Measured in one run, on one machine, on the real stack (a tiny registered model, ``llmstack.deploy()``
on a real Serve app, real HTTP from local client threads), in parts (``--part`` runs some alone):

``faults`` (#12), each scenario next to a baseline of the same load with no fault:

1. baseline: closed-loop greedy completions, no fault;
2. the model replica SIGKILLed (1 replica), then the same with ``autoscaling.min_replicas: 2``;
3. the ingress (OpenAI FastAPI) replica SIGKILLed;
4. streaming clients that disconnect after their first event (the steady load keeps running);
5. overload: 10x the clients for a few seconds;
6. a Ray Train worker killed mid-run (the test-only ``LLMSTACK_FAULT_AT_STEP`` hook), next to the same run
   without the fault: time lost, the step it resumed from, the loss curve against the clean run.

For each: requests sent / failed (by status), seconds from the fault to the first success after it and to a
success rate back at the pre-fault rate, p50/p95 latency during and after, and wrong answers served: every
200 must be a well-formed OpenAI body whose text equals the greedy answer recorded for that prompt before
any fault.

The #26 parts:

- ``resume``: greedy streaming clients while the model replica is SIGKILLed, with 1 and 2 replicas: failed
  streams, streams resumed (the server's ``llmstack_resumed_requests``), resumed text against the answer
  recorded before the fault, latency of resumed against unresumed streams, longest gap without an ok answer;
- ``overload``: 200 concurrent streams on one replica with the serving defaults: share of admitted streams that
  finish, time to the first 503, 504s, Retry-After on every 503, every error in the OpenAI shape;
- ``metrics``: ``/metrics`` scraped 20 times across two ingress replicas while requests are sent and 20 more
  after: monotonic, and equal to the requests sent;
- ``sigterm``: ``python -m llmstack deploy`` (a subprocess with its own Ray cluster) with live streams, SIGTERM:
  how each stream ended, what new requests got during the drain, exit status, time to exit.

Writes benchmarks/results/chaos.json, chaos_timeline.png (faults), chaos_resume_streams.json,
chaos_overload200.json, chaos_metrics.json, chaos_sigterm.json (one per part) and the ``## chaos`` section of
benchmarks/RESULTS.md (from the latest results file of every part).

Reproduce: python benchmarks/chaos_bench.py                 (every part, about 10 minutes on 2 CPU cores)
           python benchmarks/chaos_bench.py --part resume   (one part; comma-separate several)
           python benchmarks/chaos_bench.py --render-only   (RESULTS.md from the results files, no run)
           python benchmarks/chaos_bench.py --quick         (smoke run: shorter windows, no 2-replica app,
                                                             no Train run; its files go to a temporary folder)
Run it under the shared Ray lock: flock /tmp/llmstack-ray.lock timeout 900 python benchmarks/chaos_bench.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import RESULTS_DIR as RESULTS
from harness import cpu_name, logger, pct, write_json, write_section
from harness.cluster import start_ray, start_serve
from harness.loadgen import DONE, ClosedLoop, post_completion, sse_events
from harness.plots import pyplot

APP = "chaos"
PROMPTS = [f"line {i}:" for i in range(0, 60, 5)] + ["def add(a, b):", "The quick brown", "import os"]
MAX_TOKENS = 8
RECOVERY_WINDOW_S = 2.0  # "back at baseline": a window this long with no failure and enough successes
RECOVERY_SHARE = 0.6  # ... at least this share of the pre-fault success rate (other tenants make it noisy)
BIN_S = 0.5  # timeline bin
# Tried against the shipped INGRESS_OPTIONS (1 replica, Serve's 10 s default health check period).
log = logger("chaos-bench")


# --------------------------------------------------------------------------- load and answer checks


@dataclass
class Sample:
    """One HTTP request: when it was sent and answered, its status, and whether a 200 was right."""

    kind: str  # steady | overload | stream
    sent: float
    done: float
    status: int  # 0: no HTTP response (connection error or client timeout)
    wrong: bool = False  # a 200 whose body is malformed or whose text is not the recorded answer
    error_code: str | None = None  # the OpenAI error code of a failure, when it had one

    @property
    def ok(self) -> bool:
        return self.status == 200 and not self.wrong


def completion_body(prompt: str, **extra: Any) -> dict[str, Any]:
    return {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, **extra}


def answer_problem(body: Any, expected: str | None) -> str | None:
    """Why a 200 body is not the right answer (None: it is): shape, then text."""
    from pydantic import ValidationError

    from llmstack.serve.protocol import CompletionResponse

    try:
        response = CompletionResponse.model_validate(body)
    except ValidationError as exc:
        return f"malformed: {exc.errors()[0]['msg']}"
    if len(response.choices) != 1 or not response.id.startswith("cmpl-"):
        return "malformed: expected one choice and a cmpl- id"
    if response.usage.completion_tokens > MAX_TOKENS:
        return f"{response.usage.completion_tokens} tokens > max_tokens"
    if expected is not None and response.choices[0].text != expected:
        return f"text {response.choices[0].text!r} != recorded {expected!r}"
    return None


def record_answers(url: str) -> dict[str, str]:
    """The greedy answer for every prompt, one request at a time, before any fault."""
    import requests

    answers = {}
    for prompt in PROMPTS:
        r = requests.post(url + "/v1/completions", json=completion_body(prompt), timeout=60)
        r.raise_for_status()
        problem = answer_problem(r.json(), None)
        if problem:
            raise RuntimeError(f"reference answer for {prompt!r}: {problem}")
        answers[prompt] = r.json()["choices"][0]["text"]
    return answers


@dataclass
class Load(ClosedLoop):
    """Closed-loop clients (the harness's load generator) posting greedy completions back to back
    (``start()`` ... ``stop()``), each 200 checked against ``answers``."""

    url: str
    answers: dict[str, str]
    threads: int = 4
    kind: str = "steady"
    samples: list[Sample] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def next_sample(self, session: Any, worker: int, n: int) -> Sample:
        prompt = PROMPTS[(worker * 7 + n - 1) % len(PROMPTS)]
        answer = post_completion(session, self.url, completion_body(prompt), timeout=60)
        if answer.status == 0:
            session.close()  # a fresh connection for the next request
        if answer.status != 200:
            return Sample(self.kind, answer.sent, answer.done, answer.status, error_code=answer.error_code)
        problem = answer_problem(answer.body, self.answers[prompt])
        if problem:
            self.problems.append(f"{prompt!r}: {problem}")
        return Sample(self.kind, answer.sent, answer.done, 200, wrong=problem is not None)


# --------------------------------------------------------------------------- faults


def replica_actors(deployment: str) -> list[Any]:
    """The live replica actors of ``deployment`` in the benchmark app (state API: name, pid)."""
    from ray.util.state import list_actors

    import ray

    return list_actors(address=ray.get_runtime_context().gcs_address, limit=100,
                       filters=[("class_name", "=", f"ServeReplica:{APP}:{deployment}"), ("state", "=", "ALIVE")])


def replica_names(deployment: str) -> set[str]:
    """Names of the replica actors of ``deployment`` that GCS knows now (cheap: no state API)."""
    import ray

    prefix = f"SERVE_REPLICA::{APP}#{deployment}#"
    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)}


class ReplicaWatch:
    """Polls the replica names of a deployment: when a replacement replica first appeared after a kill."""

    def __init__(self, deployment: str, period_s: float = 0.1) -> None:
        self.deployment = deployment
        self.period_s = period_s
        self.before = replica_names(deployment)
        self.appeared: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.time()
            for name in replica_names(self.deployment) - self.before:
                self.appeared.setdefault(name, now)
            self._stop.wait(self.period_s)

    def stop(self) -> tuple[str, float] | None:
        """Stop; the first replacement replica and when it appeared (None: none did)."""
        self._stop.set()
        self._thread.join(timeout=5)
        return min(self.appeared.items(), key=lambda item: item[1], default=None)


def controller_timeline(killed: str, replacement: str) -> dict[str, float]:
    """From the Serve controller's log: when it saw the killed replica crash (epoch seconds), and how long the
    replacement took to start in all and in its constructor (model load, imports)."""
    import datetime
    import re

    import ray

    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path()) / "serve"  # noqa: SLF001
    killed_id, new_id = killed.rsplit("#", 1)[-1], replacement.rsplit("#", 1)[-1]
    found: dict[str, float] = {}
    for path in logs.glob("controller_*.log"):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            if f"Replica(id='{killed_id}'" in line and "crashed" in line:
                stamp = datetime.datetime.strptime(" ".join(line.split()[1:3]), "%Y-%m-%d %H:%M:%S,%f")
                found["crash_noticed_at"] = stamp.timestamp()
            started = re.search(r"after ([\d.]+)s .*took ([\d.]+)s", line)
            if f"Replica(id='{new_id}'" in line and started:
                found["replacement_start_s"] = float(started.group(1))
                found["replacement_constructor_s"] = float(started.group(2))
    return found


def _replacement(row: dict[str, Any]) -> str:
    if row.get("replacement_start_s") is None:
        return "no replacement replica's start was found in the controller log"
    return (f"the replacement replica took {row['replacement_start_s']:.1f} s to start "
            f"({row['replacement_constructor_s']:.1f} s of it in its constructor)")


def kill_replica(deployment: str) -> dict[str, Any]:
    """SIGKILL the worker process of one replica of ``deployment`` (a crash, not a graceful stop)."""
    actors = replica_actors(deployment)
    if not actors:
        raise RuntimeError(f"no live replica of {deployment}")
    victim = actors[0]
    os.kill(victim.pid, signal.SIGKILL)
    return {"killed": victim.name, "pid": victim.pid, "replicas_before": len(actors)}


def stream_disconnects(url: str, *, threads: int, seconds: float) -> dict[str, Any]:
    """``threads`` clients that open a long greedy stream, read its first event and hang up, for ``seconds``."""
    import requests

    opened: list[int] = []
    first_events: list[int] = []
    stop = time.time() + seconds

    def client(worker: int) -> None:
        session = requests.Session()
        n = worker
        while time.time() < stop:
            body = completion_body(PROMPTS[n % len(PROMPTS)], max_tokens=200, stream=True)
            n += 1
            try:
                with session.post(url + "/v1/completions", json=body, stream=True, timeout=30) as r:
                    opened.append(r.status_code)
                    for line in r.iter_lines():
                        if line.startswith(b"data: "):
                            first_events.append(1)
                            break
            except requests.RequestException:
                opened.append(0)
            session.close()  # the connection goes with the response: the server sees the client leave
            session = requests.Session()

    workers = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=seconds + 60)
    return {"streams_opened": len(opened), "streams_by_status": dict(Counter(opened)),
            "disconnected_after_first_event": len(first_events)}


def engine_stats() -> dict[str, Any]:
    from ray import serve

    return serve.get_deployment_handle("LLMServer", app_name=APP).stats.remote().result(timeout_s=30)


# --------------------------------------------------------------------------- one scenario


@dataclass
class Scenario:
    """A fault under steady load: ``fault`` runs at t_fault and returns facts about it (it may block: overload)."""

    name: str
    label: str
    fault: Callable[[], dict[str, Any]] | None = None
    watch: str | None = None  # deployment whose replacement replica to time
    extra_load: Callable[[], Load] | None = None  # clients added for the fault's duration (overload)


def run_scenario(scenario: Scenario, url: str, answers: dict[str, str], *, threads: int, before_s: float,
                 settle_s: float, max_wait_s: float) -> dict[str, Any]:
    """Steady load; ``before_s`` of it as the pre-fault reference; the fault; wait for recovery (at most
    ``max_wait_s`` after the fault ends) and ``settle_s`` more; every request's sample kept for the timeline."""
    load = Load(url, answers, threads=threads).start()
    time.sleep(before_s)
    watch = ReplicaWatch(scenario.watch) if scenario.watch else None
    extra = scenario.extra_load().start() if scenario.extra_load else None
    t_fault = time.time()
    facts = scenario.fault() if scenario.fault else {}
    if extra is not None:
        extra.stop()
    t_fault_end = time.time()
    reference = _rate([s for s in load.samples if s.ok and t_fault - before_s + 1.0 <= s.done < t_fault],
                      before_s - 1.0)
    if scenario.fault is None:
        time.sleep(settle_s)
    deadline = t_fault_end + max_wait_s
    while scenario.fault is not None and time.time() < deadline:
        time.sleep(0.5)
        back = back_at_rate(load.samples, t_fault_end, reference)
        if back is not None and time.time() > back + RECOVERY_WINDOW_S + settle_s:
            break
    load.stop()
    t_end = time.time()
    replacement = watch.stop() if watch else None
    samples = list(load.samples) + (list(extra.samples) if extra else [])
    problems = load.problems + (extra.problems if extra else [])
    row = summarize(samples, t_start=t_fault - before_s, t_fault=t_fault, t_fault_end=t_fault_end, t_end=t_end,
                    reference=reference, has_fault=scenario.fault is not None)
    row.update(facts)
    row["wrong_answer_examples"] = problems[:3]
    if replacement is not None:
        row["replacement_replica_seen_s"] = replacement[1] - t_fault
        steps = controller_timeline(facts["killed"], replacement[0])
        if "crash_noticed_at" in steps:
            row["controller_noticed_crash_s"] = steps.pop("crash_noticed_at") - t_fault
        row.update(steps)
    row["label"] = scenario.label
    row["timeline"] = [(s.kind, round(s.sent - t_fault, 3), round(s.done - t_fault, 3), s.status, s.wrong)
                       for s in samples]
    return row


def progress_line(row: dict[str, Any]) -> str:
    keys = ("sent", "failed", "failed_by_code", "wrong_answers", "first_success_s", "back_at_baseline_s",
            "replacement_replica_seen_s", "controller_noticed_crash_s", "replacement_start_s",
            "replacement_constructor_s", "latency_during", "latency_after", "latency", "streams_opened",
            "disconnected_after_first_event", "engine_cancelled", "by_kind")
    return json.dumps(_rounded({k: row[k] for k in keys if k in row}))


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 2)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return value


def _rate(samples: list[Sample], seconds: float) -> float:
    return len(samples) / seconds if seconds > 0 else float("nan")


def back_at_rate(samples: list[Sample], since: float, reference: float) -> float | None:
    """Start of the first ``RECOVERY_WINDOW_S`` window after ``since`` with no failed steady request and at
    least ``RECOVERY_SHARE`` of the ``reference`` success rate (None: not yet)."""
    steady = [s for s in list(samples) if s.kind == "steady" and s.done >= since]
    if not steady:
        return None
    need = RECOVERY_SHARE * reference * RECOVERY_WINDOW_S
    last = max(s.done for s in steady)
    for start in sorted(s.done for s in steady if s.ok):  # windows open at a success, never before the first
        if start + RECOVERY_WINDOW_S > last:
            break
        window = [s for s in steady if start <= s.done < start + RECOVERY_WINDOW_S]
        if all(s.ok for s in window) and len(window) >= need:
            return start
    return None


def summarize(samples: list[Sample], *, t_start: float, t_fault: float, t_fault_end: float, t_end: float,
              reference: float, has_fault: bool) -> dict[str, Any]:
    """The scenario's figures: counts by status and kind, recovery times, latency during and after."""
    steady = [s for s in samples if s.kind == "steady"]
    after_fault = [s for s in samples if s.sent >= t_fault or s.done >= t_fault]
    failed = [s for s in after_fault if not s.ok]
    row: dict[str, Any] = {
        "seconds": t_end - t_start, "pre_fault_ok_per_s": reference,
        "sent": len(after_fault), "failed": sum(s.status != 200 for s in after_fault),
        "failed_by_status": dict(Counter(str(s.status) for s in failed if s.status != 200)),
        "failed_by_code": dict(Counter(s.error_code or "-" for s in failed if s.status != 200)),
        "wrong_answers": sum(s.wrong for s in samples), "ok_total": sum(s.ok for s in samples),
        "by_kind": {kind: {"sent": sum(s.kind == kind for s in after_fault),
                           "failed": sum(s.kind == kind and s.status != 200 for s in after_fault)}
                    for kind in sorted({s.kind for s in samples})},
    }
    latency = lambda group: {"p50_ms": 1000 * pct([s.done - s.sent for s in group if s.ok], 50),  # noqa: E731
                             "p95_ms": 1000 * pct([s.done - s.sent for s in group if s.ok], 95),
                             "ok": sum(s.ok for s in group)}
    if not has_fault:
        row["latency"] = latency([s for s in steady if s.sent >= t_fault])
        row["ok_per_s"] = _rate([s for s in steady if s.ok and s.done >= t_fault], t_end - t_fault)
        return row
    firsts = [s.done for s in steady if s.ok and s.sent >= t_fault]
    back = back_at_rate(samples, t_fault_end, reference)
    row["first_success_s"] = (min(firsts) - t_fault) if firsts else None
    row["back_at_baseline_s"] = (back - t_fault) if back is not None else None
    row["fault_lasted_s"] = t_fault_end - t_fault
    recovered = back if back is not None else t_end
    row["latency_during"] = latency([s for s in steady if t_fault <= s.sent < recovered])
    row["latency_after"] = latency([s for s in steady if s.sent >= recovered])
    row["failed_sent_before_fault"] = sum(s.sent < t_fault and s.status != 200 for s in samples)
    return row


# --------------------------------------------------------------------------- the Train worker


def train_kill(workdir: Path, *, steps: int, fault_at: int, checkpoint_every: int) -> dict[str, Any]:
    """A short DDP run with rank 1 killed (os._exit) after ``fault_at``, next to the same run without the fault."""
    from llmstack.train import train

    def config(name: str) -> dict[str, Any]:
        return {"name": name, "registry": str(workdir / "train-registry"), "storage_path": str(workdir / "runs"),
                "data": {"max_documents": 300, "vocab_size": 512, "block_size": 64},
                "training": {"max_steps": steps, "micro_batch_size": 2, "grad_accum_steps": 1, "warmup_steps": 2,
                             "learning_rate": 3e-3, "eval_every": steps, "checkpoint_every": checkpoint_every,
                             "seed": 0},
                "scaling": {"num_workers": 2, "strategy": "ddp", "max_failures": 1}}

    row: dict[str, Any] = {"steps": steps, "fault_after_step": fault_at, "checkpoint_every": checkpoint_every}
    log(f"   train: clean run ({steps} steps, 2 DDP workers)")
    started = time.perf_counter()
    clean = train(config("chaos-clean"), progress=False)
    row["clean_wall_s"] = time.perf_counter() - started
    flag = workdir / "train-fault-fired"
    os.environ.update({"LLMSTACK_FAULT_AT_STEP": str(fault_at), "LLMSTACK_FAULT_FLAG": str(flag),
                       "LLMSTACK_FAULT_RANK": "1"})
    log(f"   train: the same run, worker rank 1 killed after step {fault_at}")
    try:
        started = time.perf_counter()
        faulted = train(config("chaos-faulted"), progress=False)
        row["faulted_wall_s"] = time.perf_counter() - started
    finally:
        for key in ("LLMSTACK_FAULT_AT_STEP", "LLMSTACK_FAULT_FLAG", "LLMSTACK_FAULT_RANK"):
            os.environ.pop(key, None)
    row["worker_died"] = flag.exists()
    row["recoveries"] = faulted.recoveries
    row["completed_steps"] = [r["step"] for r in faulted.history] == list(range(1, steps + 1))
    if flag.exists():  # the hook writes the flag right before the worker exits: the kill time
        redone = next((r for r in faulted.history if r["step"] == fault_at), None)
        if redone is not None:
            row["kill_to_step_redone_s"] = redone["time"] - flag.stat().st_mtime
    row["time_lost_s"] = row["faulted_wall_s"] - row["clean_wall_s"]
    row["max_loss_diff_vs_clean"] = max(abs(a["loss"] - b["loss"]) for a, b in zip(clean.history, faulted.history))
    return row


# --------------------------------------------------------------------------- streams (the #26 parts)


@dataclass
class Stream:
    """One streamed request as the client saw it: status, events, text, and how it ended."""

    sent: float
    status: int = 0  # 0: no HTTP response (connection error or client timeout)
    headers_at: float | None = None
    done: float = 0.0
    event_times: list[float] = field(default_factory=list)  # arrival of each data event with text
    text: dict[int, str] = field(default_factory=dict)  # by choice index
    finish_reasons: dict[int, str | None] = field(default_factory=dict)
    got_done: bool = False  # the [DONE] marker arrived
    error: dict[str, Any] | None = None  # an SSE error event's "error" (or a non-200 body's)
    retry_after: str | None = None
    openai_shape: bool = True  # every error this request carried has the OpenAI shape
    exception: str | None = None  # the client-side exception that cut it
    content_type: str = ""

    @property
    def completed(self) -> bool:
        """A 200 that ran to its end: [DONE], no error event, every choice finished."""
        return (self.status == 200 and self.got_done and self.error is None and bool(self.finish_reasons)
                and all(reason is not None for reason in self.finish_reasons.values()))

    @property
    def latency(self) -> float:
        return self.done - self.sent

    def max_gap(self) -> float:
        """The longest wait between two events (from the response headers for the first)."""
        return self.widest_gap()[1]

    def widest_gap(self) -> tuple[float, float]:
        """When the longest wait between two events began, and how long it was (0, 0 for no events)."""
        times = ([self.headers_at] if self.headers_at else []) + self.event_times
        return max(((a, b - a) for a, b in zip(times, times[1:])), key=lambda gap: gap[1], default=(0.0, 0.0))


def refusal_source(message: str) -> str:
    """Which part of the stack wrote a 503's message: llmstack's admission (a predicted finish past the timeout)
    or Serve's queue bound (backpressure, translated by the ingress)."""
    if "would finish" in message or "would start answering" in message:
        return "admission (predicted past the timeout)"
    if "too many requests are queued" in message:
        return "queue full (max_ongoing + max_queued)"
    return "other"


def is_openai_error(body: Any) -> bool:
    """``{"error": {"message": str, "type": str, "code": ...}}``: the OpenAI error shape."""
    error = body.get("error") if isinstance(body, dict) else None
    return (isinstance(error, dict) and isinstance(error.get("message"), str) and isinstance(error.get("type"), str)
            and "code" in error)


def read_stream(session: Any, url: str, body: dict[str, Any], *, timeout: float = 120,
                on_event: Callable[[Stream], None] | None = None) -> Stream:
    """POST one streamed completion and read it to its end (``on_event`` after each data event)."""
    import requests

    sample = Stream(sent=time.time())
    try:
        with session.post(url + "/v1/completions", json=body, stream=True, timeout=timeout) as r:
            sample.status, sample.headers_at = r.status_code, time.time()
            sample.retry_after = r.headers.get("Retry-After")
            sample.content_type = r.headers.get("content-type", "")
            if r.status_code != 200:
                try:
                    payload = r.json()
                except ValueError:
                    payload = None
                sample.openai_shape = is_openai_error(payload) and sample.content_type.startswith("application/json")
                sample.error = payload.get("error") if sample.openai_shape else {"raw": r.text[:200]}
                return sample
            for event in sse_events(r):
                if event is DONE:
                    sample.got_done = True
                    continue
                if "error" in event:
                    sample.openai_shape = sample.openai_shape and is_openai_error(event)
                    sample.error = event["error"]
                    continue
                for choice in event.get("choices", []):
                    index = choice.get("index", 0)
                    sample.text[index] = sample.text.get(index, "") + (choice.get("text") or "")
                    sample.finish_reasons[index] = choice.get("finish_reason") or sample.finish_reasons.get(index)
                if event.get("choices"):
                    sample.event_times.append(time.time())
                    if on_event is not None:
                        on_event(sample)
    except (requests.RequestException, ValueError) as exc:
        sample.exception = type(exc).__name__
    finally:
        sample.done = time.time()
    return sample


STREAM_TOKENS = 32  # tokens of a greedy stream in the resumption part


def stream_body(prompt: str, **extra: Any) -> dict[str, Any]:
    return {"prompt": prompt, "max_tokens": STREAM_TOKENS, "temperature": 0, "stream": True, **extra}


def record_stream_answers(url: str) -> dict[str, str]:
    """The greedy streamed text for every prompt, one stream at a time, before any fault."""
    import requests

    answers = {}
    with requests.Session() as session:
        for prompt in PROMPTS:
            sample = read_stream(session, url, stream_body(prompt), timeout=60)
            if not sample.completed:
                raise RuntimeError(f"reference stream for {prompt!r} did not complete: {sample}")
            answers[prompt] = sample.text[0]
    return answers


@dataclass
class StreamLoad(ClosedLoop):
    """Closed-loop clients reading greedy streams back to back, each checked against ``answers``."""

    url: str
    answers: dict[str, str]
    threads: int = 4
    samples: list[tuple[str, Stream]] = field(default_factory=list)

    def next_sample(self, session: Any, worker: int, n: int) -> tuple[str, Stream]:
        prompt = PROMPTS[(worker * 7 + n - 1) % len(PROMPTS)]
        sample = read_stream(session, self.url, stream_body(prompt), timeout=90)
        if sample.status == 0 or sample.exception:
            session.close()
        return prompt, sample


def resumed_total(url: str) -> float:
    """``llmstack_resumed_requests_total`` summed over its series in the app's /metrics (cluster-wide)."""
    import requests

    text = requests.get(url + "/metrics", timeout=30).text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("llmstack_resumed_requests_total"))


def longest_gap(times: list[float], start: float, end: float) -> float:
    """The longest interval in [start, end] with none of ``times`` in it."""
    points = [start] + sorted(t for t in times if start <= t <= end) + [end]
    return max(b - a for a, b in zip(points, points[1:]))


def resume_under_kill(url: str, answers: dict[str, str], *, replicas: int, threads: int, kills: int,
                      before_s: float, settle_s: float) -> dict[str, Any]:
    """Greedy streaming clients; the model replica SIGKILLed ``kills`` times (each after the app is back at
    ``replicas`` running replicas); every stream's text compared with the answer recorded before any fault."""
    from ray import serve

    def running() -> int:
        return serve.status().applications[APP].deployments["LLMServer"].replica_states.get("RUNNING", 0)

    resumed_before = resumed_total(url)
    load = StreamLoad(url, answers, threads=threads).start()
    time.sleep(before_s)
    kill_times, killed = [], []
    names_before: set[str] = set()  # the replica names before the last kill
    for k in range(kills):
        if k:  # the replacement of the last kill must be up: a new replica name, and every replica RUNNING
            deadline = time.time() + 90
            while time.time() < deadline and not (replica_names("LLMServer") - names_before
                                                  and running() >= replicas):
                time.sleep(0.5)
            time.sleep(before_s)
        names_before = replica_names("LLMServer")
        # kill a replica that has streams in flight (with 2 replicas the router spreads them)
        kill_times.append(time.time())
        killed.append(kill_replica("LLMServer"))
    deadline = time.time() + 90
    while time.time() < deadline:  # until a stream sent after the last kill completed, then settle
        if any(s.completed and s.sent > kill_times[-1] for _, s in list(load.samples)):
            break
        time.sleep(0.2)
    time.sleep(settle_s)
    load.stop()
    t_end = time.time()
    # Ray's metrics agents export every few seconds: wait until the counter stops moving
    resumed, seen_at = resumed_total(url) - resumed_before, time.time()
    while time.time() - seen_at < 12:
        time.sleep(2)
        now = resumed_total(url) - resumed_before
        if now != resumed:
            resumed, seen_at = now, time.time()
        elif time.time() - t_end > 10:
            break
    samples = list(load.samples)
    first_kill = kill_times[0]
    spanning = [(p, s) for p, s in samples if any(s.sent < t <= s.done for t in kill_times)]
    others = [(p, s) for p, s in samples if s.completed and not any(s.sent < t <= s.done for t in kill_times)]
    # Which in-flight streams were resumed is not visible to the client: with one replica all of them were; with
    # two, take the in-flight streams with the longest wait between two events (as many as the server counted).
    by_gap = sorted(spanning, key=lambda ps: -ps[1].max_gap())
    resumed_guess = by_gap[:int(resumed)] if replicas > 1 else spanning
    failed = [s for _, s in samples if not s.completed]
    wrong = [(p, s) for p, s in samples if s.completed and s.text.get(0) != answers[p]]
    ok_times = [s.done for p, s in samples if s.completed and s.text.get(0) == answers[p]]
    event_times = [t for _, s in samples for t in s.event_times]
    lat = lambda group: {"p50_ms": 1000 * pct([s.latency for _, s in group], 50) if group else None,  # noqa: E731
                         "p95_ms": 1000 * pct([s.latency for _, s in group], 95) if group else None,
                         "n": len(group)}
    return {
        "replicas": replicas, "threads": threads, "kills": killed, "kill_at_s": [t - first_kill for t in kill_times],
        "streams": len(samples), "failed": len(failed),
        "failed_detail": Counter(f"{s.status}:{(s.error or {}).get('code', s.exception or '-')}" for s in failed),
        "in_flight_at_kill": len(spanning), "resumed_by_server": resumed,
        "in_flight_identical": sum(s.completed and s.text.get(0) == answers[p] for p, s in spanning),
        "in_flight_completed": sum(s.completed for _, s in spanning),
        "resumed_identical": all(s.completed and s.text.get(0) == answers[p] for p, s in resumed_guess),
        "wrong_texts": len(wrong),
        "wrong_examples": [f"{p!r}: {s.text.get(0)!r} != {answers[p]!r}" for p, s in wrong[:3]],
        "latency_resumed": lat(resumed_guess), "latency_unresumed": lat(others),
        "longest_gap_without_ok_s": longest_gap(ok_times, first_kill, t_end),
        "longest_gap_without_token_s": longest_gap(event_times, first_kill, t_end),
        "max_event_gap_resumed_s": max((s.max_gap() for _, s in resumed_guess), default=None),
        "seconds": t_end - samples[0][1].sent if samples else 0.0,
        # per stream, seconds from the first kill: sent, first event, done, widest gap (start, length), status
        "timeline": [(round(s.sent - first_kill, 3), round(s.event_times[0] - first_kill, 3) if s.event_times else None,
                      round(s.done - first_kill, 3), round(s.widest_gap()[0] - first_kill, 3),
                      round(s.widest_gap()[1], 3), "ok" if s.completed else f"{s.status}:{s.exception}")
                     for _, s in samples],
    }


OVERLOAD_STREAMS = 200
OVERLOAD_TOKENS = 64


def overload_streams(url: str, *, streams: int, max_tokens: int) -> dict[str, Any]:
    """``streams`` greedy streams of ``max_tokens`` tokens (EOS ignored) opened at once, each read to its end:
    what was admitted and finished, what was refused (and when), and the shape of every error."""
    import requests

    gate = threading.Barrier(streams)
    results: list[Stream | None] = [None] * streams

    def client(i: int) -> None:
        with requests.Session() as session:
            gate.wait()
            body = stream_body(PROMPTS[i % len(PROMPTS)], max_tokens=max_tokens, ignore_eos=True, seed=i)
            results[i] = read_stream(session, url, body, timeout=180)

    workers = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(streams)]
    for worker in workers:
        worker.start()
    t0 = time.time()  # the barrier opens once the last thread is waiting: within milliseconds of this
    for worker in workers:
        worker.join(timeout=240)
    samples = [s for s in results if s is not None]
    t0 = min((s.sent for s in samples), default=t0)
    admitted = [s for s in samples if s.status == 200]
    refused = [s for s in samples if s.status == 503]
    timeouts = [s for s in samples if s.status == 504 or (s.error or {}).get("code") == "timeout"]
    return {
        "streams": streams, "max_tokens": max_tokens, "answered": len(samples),
        "by_status": dict(Counter(str(s.status) for s in samples)),
        "admitted": len(admitted), "admitted_completed": sum(s.completed for s in admitted),
        "admitted_ended_by_error": dict(Counter((s.error or {}).get("code", "-") for s in admitted
                                                if s.error is not None)),
        "admitted_cut": sum(s.error is None and not s.completed for s in admitted),
        "first_503_s": min((s.headers_at - t0 for s in refused if s.headers_at), default=None),
        "last_503_s": max((s.headers_at - t0 for s in refused if s.headers_at), default=None),
        "refusal_codes": dict(Counter((s.error or {}).get("code", "-") for s in samples if s.status not in (0, 200))),
        # who refused: Serve's count-bounded queue (backpressure) or llmstack's time-based admission
        "refused_by": dict(Counter(refusal_source((s.error or {}).get("message", "")) for s in refused)),
        "timeouts_504": len(timeouts),
        "refused_with_retry_after": sum(bool(s.retry_after) for s in refused),
        "errors": sum(s.error is not None for s in samples),
        "errors_openai_shape": sum(s.error is not None and s.openai_shape for s in samples),
        "no_response": sum(s.status == 0 for s in samples),
        "admitted_latency_p50_s": pct([s.latency for s in admitted if s.completed], 50) if admitted else None,
        "admitted_latency_max_s": max((s.latency for s in admitted if s.completed), default=None),
        "first_token_p95_s": pct([s.event_times[0] - s.sent for s in admitted if s.event_times], 95)
        if admitted else None,
        "wall_s": max((s.done for s in samples), default=t0) - t0,
    }


# --------------------------------------------------------------------------- /metrics across two ingress replicas


def requests_total(text: str) -> tuple[float, float]:
    """``llmstack_requests_total{route="completions",status="200"}`` and ``vllm:e2e_request_latency_seconds_count``
    summed over their series."""
    import re

    totals = []
    for sample, labels in (("llmstack_requests_total", {"route": "completions", "status": "200"}),
                           ("vllm:e2e_request_latency_seconds_count", {})):
        total = 0.0
        for match in re.finditer(rf"^{re.escape(sample)}(?:{{([^}}]*)}})? (\S+)$", text, flags=re.M):
            found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
            if all(found.get(k) == v for k, v in labels.items()):
                total += float(match.group(2))
        totals.append(total)
    return totals[0], totals[1]


def metrics_scrapes(url: str, *, requests_sent: int, scrapes: int, period_s: float) -> dict[str, Any]:
    """``requests_sent`` completions sent over the first half of ``scrapes`` scrapes of /metrics (one every
    ``period_s``); then the scrapes go on. Monotonic? Do the last ones equal what was sent?"""
    import requests

    sent: list[int] = []
    statuses: list[int] = []
    spread_s = scrapes * period_s / 2

    def sender() -> None:
        with requests.Session() as session:
            for i in range(requests_sent):
                target = time.time() + spread_s / requests_sent
                r = session.post(url + "/v1/completions", json=completion_body(PROMPTS[i % len(PROMPTS)]),
                                 timeout=60)
                statuses.append(r.status_code)
                sent.append(i)
                time.sleep(max(0.0, target - time.time()))

    thread = threading.Thread(target=sender, daemon=True)
    t0 = time.time()
    thread.start()
    rows = []
    with requests.Session() as session:
        for _ in range(scrapes):
            target = time.time() + period_s
            completions, e2e = requests_total(session.get(url + "/metrics", timeout=30).text)
            rows.append({"t": time.time() - t0, "sent_ok": statuses.count(200), "requests_total": completions,
                         "e2e_count": e2e})
            time.sleep(max(0.0, target - time.time()))
    thread.join(timeout=120)
    totals = [r["requests_total"] for r in rows]
    ok = statuses.count(200)
    # after the load: how long until the cluster total reads what was sent (Ray's agents export periodically),
    # then as many scrapes again, each of which must read exactly that
    t_sent = time.time()
    final, e2e = requests_total(requests.get(url + "/metrics", timeout=30).text)
    while final != ok and time.time() - t_sent < 60:
        time.sleep(0.5)
        final, e2e = requests_total(requests.get(url + "/metrics", timeout=30).text)
    settled_s = time.time() - t_sent if final == ok else None
    after = []
    with requests.Session() as session:
        for _ in range(scrapes):
            after.append(requests_total(session.get(url + "/metrics", timeout=30).text))
            time.sleep(0.1)
    return {"requests_sent": len(statuses), "requests_ok": ok, "scrapes_during": rows,
            "scrapes_after": [{"requests_total": a, "e2e_count": b} for a, b in after],
            "monotonic_during": all(b >= a for a, b in zip(totals, totals[1:])),
            "e2e_monotonic_during": all(b["e2e_count"] >= a["e2e_count"] for a, b in zip(rows, rows[1:])),
            "never_above_sent": all(t <= ok for t in totals),
            "settled_after_load_s": settled_s,
            "after_all_equal_sent": all(a == ok and b == ok for a, b in after),
            "after_values": sorted({a for a, _ in after}), "after_e2e_values": sorted({b for _, b in after}),
            "max_lag_during": max((r["sent_ok"] - r["requests_total"] for r in rows), default=None)}


# --------------------------------------------------------------------------- SIGTERM to `llmstack deploy`


def sigterm_drain(workdir: Path, *, port: int, grace_s: float, short_streams: int, long_streams: int,
                  probe_period_s: float = 0.1) -> dict[str, Any]:
    """``python -m llmstack deploy`` in a subprocess (its own Ray cluster), ``short_streams`` streams that fit in
    the grace period and ``long_streams`` that cannot, SIGTERM once every stream has begun: how each stream
    ended, what new requests got during the drain, the exit status and the time to exit."""
    import subprocess

    import requests

    from llmstack.serve._testing import make_registry, wait_healthy

    registry = str(workdir / "drain-registry")
    make_registry(registry, adapters=0)
    src = Path(__file__).resolve().parents[1] / "src"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_USAGE_STATS_ENABLED="0", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(src), env.get("PYTHONPATH", "")]))
    log_path = workdir / "deploy.log"
    command = [sys.executable, "-m", "llmstack", "deploy", "model=tiny-lm@production", f"registry={registry}",
               f"http.port={port}", "engine.max_tokens_limit=200",
               f"deployment.graceful_shutdown_timeout_s={grace_s:g}",
               "deployment.ray_actor_options.num_cpus=0.5", "http.request_timeout_s=600"]
    started = time.time()
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    row: dict[str, Any] = {"grace_s": grace_s,
                           "deploy_command": " ".join(["python -m llmstack deploy", *command[4:]])}
    try:
        wait_healthy(base, 300, period=0.5, process=proc, log_path=log_path)
        row["start_s"] = time.time() - started
        with requests.Session() as session:  # warm: the first forward passes of a replica are slow
            for i in range(3):
                session.post(base + "/v1/completions", json={"prompt": "warm", "max_tokens": 8, "seed": i}, timeout=60)
        # every stream one sequence, all of them in one batch (max_batch_size 8): each starts at once; the long
        # ones need ~200 decode steps, more than the grace period, the short ones a few
        long_body = {"prompt": "once upon a time", "max_tokens": 200, "ignore_eos": True, "stream": True}
        short_body = {"prompt": "once upon", "max_tokens": 16, "ignore_eos": True, "stream": True}
        kinds = ["long"] * long_streams + ["short"] * short_streams
        budget = {"long": 200, "short": 16}
        samples: list[Stream | None] = [None] * len(kinds)
        first_events = [threading.Event() for _ in kinds]
        term_at: list[float] = []
        at_term: dict[int, tuple[int, float, float]] = {}  # stream -> (events, first event, rate) at SIGTERM

        def client(i: int) -> None:
            def on_event(sample: Stream) -> None:
                first_events[i].set()
                if term_at and i not in at_term and sample.event_times[-1] >= term_at[0]:
                    before = [t for t in sample.event_times if t < term_at[0]]
                    at_term[i] = (len(before), sample.event_times[0], before[-1] if before else sample.event_times[0])

            with requests.Session() as session:
                samples[i] = read_stream(session, base, long_body if kinds[i] == "long" else short_body,
                                         timeout=300, on_event=on_event)
            first_events[i].set()

        workers = []
        for i in range(len(kinds)):  # the long ones first: every stream is live at once when SIGTERM comes
            workers.append(threading.Thread(target=client, args=(i,), daemon=True))
            workers[-1].start()
            if kinds[i] == "long":
                first_events[i].wait(120)
        for event in first_events:
            event.wait(120)
        term_at.append(time.time())
        proc.send_signal(signal.SIGTERM)
        probes: list[dict[str, Any]] = []
        while proc.poll() is None:  # new requests during the drain
            sent = time.time()
            try:
                r = requests.post(base + "/v1/completions", json={"prompt": "x", "max_tokens": 1}, timeout=30)
                try:
                    body = r.json()
                except ValueError:
                    body = None
                probes.append({"t": sent - term_at[0], "status": r.status_code, "body": r.text[:160],
                               "retry_after": r.headers.get("Retry-After"), "openai_shape": is_openai_error(body),
                               "code": (body or {}).get("error", {}).get("code") if isinstance(body, dict) else None})
            except requests.RequestException as exc:
                probes.append({"t": sent - term_at[0], "status": 0, "exception": type(exc).__name__})
            time.sleep(probe_period_s)
        status = proc.wait(timeout=120)
        exited_s = time.time() - term_at[0]
        for worker in workers:
            worker.join(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    t_term = term_at[0]
    streams = []
    for i, (kind, sample) in enumerate(zip(kinds, samples)):
        if sample is None:
            streams.append({"kind": kind, "outcome": "client thread did not return"})
            continue
        received = len(sample.event_times)
        before = at_term.get(i, (received,))[0]
        # the stream's own pace over its whole life (tokens per second): when the rest would have ended
        span = sample.event_times[-1] - sample.event_times[0] if received > 1 else 0.0
        rate = (received - 1) / span if span > 0 else None
        predicted_end = (t_term + (budget[kind] - before) / rate) if rate else None
        if sample.status != 200:
            outcome = f"answered {sample.status} ({(sample.error or {}).get('code', sample.exception)})"
        elif sample.completed:
            outcome = "completed"
        elif sample.error is not None and sample.got_done:
            outcome = f"error event + [DONE] ({sample.error.get('code')})"
        else:
            outcome = "cut without [DONE]" + (f" ({sample.exception})" if sample.exception else "")
        streams.append({"kind": kind, "outcome": outcome, "events_before_sigterm": before, "events": received,
                        "started_s": sample.sent - t_term, "status": sample.status, "error": sample.error,
                        "budget": budget[kind], "ended_s": sample.done - t_term,
                        "predicted_end_s": None if predicted_end is None else predicted_end - t_term,
                        "fits": predicted_end is not None and predicted_end - t_term <= grace_s,
                        "error_openai_shape": sample.openai_shape})
    log_text = log_path.read_text(errors="replace")
    refused = [p for p in probes if p["status"] == 503]
    row.update({
        "exit_status": status, "exit_s": exited_s, "aborted_in_log": "Aborted" in log_text or "core dumped" in log_text,
        "streams": streams,
        "fit_completed": sum(s["fits"] and s["outcome"] == "completed" for s in streams),
        "fit": sum(s["fits"] for s in streams),
        "completed": sum(s["outcome"] == "completed" for s in streams),
        "ended_by_error_and_done": sum(s["outcome"].startswith("error event") for s in streams),
        "cut": sum(s["outcome"].startswith("cut") for s in streams),
        "probes": len(probes), "probes_by_status": dict(Counter(str(p["status"]) for p in probes)),
        "probes_503_with_retry_after": sum(bool(p.get("retry_after")) for p in refused),
        "probes_503_openai_shape": sum(p["openai_shape"] for p in refused),
        "probe_codes": dict(Counter(str(p.get("code")) for p in refused)),
        "first_503_s": min((p["t"] for p in refused), default=None),
        "probe_other": [p for p in probes if p["status"] not in (0, 503)][:5],
        "log_tail": log_text[-1500:],
    })
    return row


# --------------------------------------------------------------------------- plot and report


def plot_timelines(rows: dict[str, dict[str, Any]], path: Path) -> bool:
    """One panel per scenario: requests answered ok / failed per second (by answer time), fault marked."""
    try:
        plt = pyplot()
    except ImportError:
        return False
    fig, axes = plt.subplots(len(rows), 1, figsize=(9, 1.9 * len(rows)), squeeze=False)
    for ax, (name, row) in zip(axes[:, 0], rows.items()):
        times = [t for _, _, t, _, _ in row["timeline"]]
        lo, hi = min(times), max(times)
        bins = int((hi - lo) / BIN_S) + 1
        ok, failed = [0] * bins, [0] * bins
        for _, _, done, status, wrong in row["timeline"]:
            (ok if status == 200 and not wrong else failed)[int((done - lo) / BIN_S)] += 1 / BIN_S
        xs = [lo + i * BIN_S for i in range(bins)]
        ax.bar(xs, ok, width=BIN_S, align="edge", color="tab:green", label="ok")
        ax.bar(xs, failed, width=BIN_S, align="edge", bottom=ok, color="tab:red", label="failed")
        if name != "baseline":
            ax.axvline(0, color="k", ls="--", lw=0.9)
            if row.get("fault_lasted_s", 0) > 0.5:
                ax.axvspan(0, row["fault_lasted_s"], color="grey", alpha=0.15)
            if row.get("back_at_baseline_s") is not None:
                ax.axvline(row["back_at_baseline_s"], color="tab:blue", ls=":", lw=1.2)
        ax.set_title(row["label"], fontsize=9, loc="left")
        ax.set_ylabel("req/s", fontsize=8)
        ax.tick_params(labelsize=8)
    axes[0, 0].legend(fontsize=7, loc="upper right")
    axes[-1, 0].set_xlabel("seconds from the fault (dashed: fault; dotted: back at the pre-fault rate)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _s(value: float | None) -> str:
    return "never" if value is None else f"{value:.1f} s"


def _ms(value: float | None) -> str:
    return "-" if value is None or value != value else f"{value:.0f}"


def report(results: dict[str, Any], command: str, plotted: bool, others: dict[str, dict[str, Any] | None],
           total_s: float | None = None) -> str:
    rows = results["scenarios"]
    base = rows["baseline"]
    machine = results["machine"]
    lines = ["## chaos", "",
             f"`{command}` ({results['wall_s'] / 60:.1f} min on {machine['cpus']} CPU cores, {machine['cpu']}; "
             f"Ray {machine['ray']}; load average {machine['load_avg_1m_at_start']:.0f} at start: other jobs shared "
             "the cores, so latencies are noisy; the counts and recovery times are the point). Tiny random-init "
             f"model served by `llmstack.deploy()` ({results['config_summary']}); {results['threads']} closed-loop "
             f"HTTP clients sending greedy completions of {MAX_TOKENS} tokens. Each fault is a real SIGKILL of the "
             "replica's worker process. Every 200 is checked: a well-formed OpenAI body whose text equals the "
             "answer recorded for that prompt before any fault. *First ok*: fault to the first success of a "
             f"request sent after it; *back at baseline*: fault to the start of the first {RECOVERY_WINDOW_S:g} s "
             f"window with no failure and >= {RECOVERY_SHARE:.0%} of the pre-fault success rate; *during*: requests "
             "sent between the fault and that point, *after*: sent later.", "",
             "| scenario | requests | failed (by status) | first ok | back at baseline | p50 / p95 during (ms) "
             "| p50 / p95 after (ms) | wrong answers |",
             "|---|---|---|---|---|---|---|---|",
             f"| baseline, no fault ({base['seconds']:.0f} s, {base['ok_per_s']:.1f} ok/s) | {base['sent']} | "
             f"{base['failed']} | - | - | {_ms(base['latency']['p50_ms'])} / {_ms(base['latency']['p95_ms'])} | - | "
             f"{base['wrong_answers']} |"]
    for name, row in rows.items():
        if name == "baseline":
            continue
        by_status = ", ".join(f"{k}: {v}" for k, v in sorted(row["failed_by_status"].items())) or "-"
        during, after = row["latency_during"], row["latency_after"]
        lines.append(f"| {row['label']} | {row['sent']} | {row['failed']} ({by_status}) | "
                     f"{_s(row['first_success_s'])} | {_s(row['back_at_baseline_s'])} | "
                     f"{_ms(during['p50_ms'])} / {_ms(during['p95_ms'])} | "
                     f"{_ms(after['p50_ms'])} / {_ms(after['p95_ms'])} | {row['wrong_answers']} |")
    lines.append("")
    notes = []
    for name in ("model_kill_1", "model_kill_2", "ingress_kill", "ingress_kill_2"):
        row = rows.get(name)
        if row and row.get("controller_noticed_crash_s") is not None:
            notes.append(f"{row['label']}: the controller noticed the crash {row['controller_noticed_crash_s']:.1f} s "
                         f"after the kill; {_replacement(row)}; "
                         f"first ok {_s(row['first_success_s'])}; failures by code: "
                         + (", ".join(f"`{k}` {v}" for k, v in row["failed_by_code"].items()) or "none") + ".")
    stream = rows.get("stream_disconnect")
    if stream:
        notes.append(f"Streaming disconnects: {stream['streams_opened']} streams of 200 tokens opened, "
                     f"{stream['disconnected_after_first_event']} hung up after the first event; the replica counted "
                     f"{stream['engine_cancelled']} generations cancelled; steady load: {stream['failed']} failed.")
    over = rows.get("overload")
    if over:
        kinds = over["by_kind"].get("overload", {})
        notes.append(f"Overload: {over['overload_clients']} extra clients for {over['fault_lasted_s']:.1f} s: "
                     f"{kinds.get('sent', 0)} of their requests sent, {kinds.get('failed', 0)} refused "
                     "(" + ", ".join(f"`{k}` {v}" for k, v in over["failed_by_code"].items()) + "); "
                     f"steady clients' failures {over['by_kind'].get('steady', {}).get('failed', 0)}; "
                     f"'back at baseline' counts from the end of the burst.")
    train_row = results.get("train")
    if train_row:
        rec = (train_row["recoveries"] or [None])[0]
        resumed = (f"resumed from step {rec['resumed_from_step']} ({rec['steps_lost']} steps replayed)" if rec else
                   "TrainResult.recoveries recorded no restart")
        parts = [f"Train worker killed after step {train_row['fault_after_step']} of {train_row['steps']} "
                 f"(2 DDP workers, checkpoint every {train_row['checkpoint_every']}, `scaling.max_failures: 1`): "
                 f"worker died: {train_row['worker_died']}; {resumed}; all steps completed: "
                 f"{train_row['completed_steps']}"]
        if "kill_to_step_redone_s" in train_row:
            parts.append(f"kill to step {train_row['fault_after_step']} done again: "
                         f"{train_row['kill_to_step_redone_s']:.1f} s")
        parts.append(f"wall {train_row['faulted_wall_s']:.0f} s vs {train_row['clean_wall_s']:.0f} s clean "
                         f"(**{train_row['time_lost_s']:+.0f} s**); largest per-step loss difference from the clean "
                         f"run {train_row['max_loss_diff_vs_clean']:.1e}")
        notes.append("; ".join(parts) + ".")
    lines += [f"- {note}" for note in notes]
    if plotted:
        lines += ["", "![ok / failed requests per second around each fault](results/chaos_timeline.png)"]
    lines += parts_report(others, total_s)
    return "\n".join(lines) + "\n"


def _met(ok: bool) -> str:
    return "**met**" if ok else "**missed**"


def parts_report(others: dict[str, dict[str, Any] | None], total_s: float | None) -> list[str]:
    """The #26 measurements (resumption, SIGTERM drain, overload at 200 streams, /metrics across two ingress
    replicas), each from its own results file with the command that reproduces it alone."""
    lines: list[str] = []

    def head(title: str, row: dict[str, Any]) -> None:
        machine = row["machine"]
        lines.extend(["", f"### {title}", "",
                      f"`{row['command']}` ({row['wall_s']:.0f} s; load average {machine['load_avg_1m_at_start']:.0f} "
                      f"when the part began, on {machine['cpus']} cores shared with other jobs)."])

    resume = others.get("resume")
    if resume and "runs" in resume:
        head("Replica kill under streaming load (stream resumption)", resume)
        lines += ["", f"{resume['threads']} closed-loop clients reading greedy streams of up to "
                  f"{resume['stream_tokens']} tokens; the model replica's worker SIGKILLed (with 2 replicas: twice, "
                  "each after the replacement was running). Every stream's text is compared with the answer recorded "
                  "for its prompt before any fault. *Resumed* is the server's `llmstack_resumed_requests` counter "
                  "(the client cannot see which stream was resumed: with 1 replica every stream in flight at the kill "
                  "was; with 2, the in-flight streams with the longest wait between two events, as many as the server "
                  "counted, stand for them in the latency and identity columns).", "",
                  "| model replicas | streams | failed | in flight at a kill | resumed (server) | resumed text = "
                  "recorded | p50 / p95 resumed (ms) | p50 / p95 unresumed (ms) | longest gap without an ok answer "
                  "| longest gap without a token |", "|---|---|---|---|---|---|---|---|---|---|"]
        for replicas, run in sorted(resume["runs"].items()):
            res, unres = run["latency_resumed"], run["latency_unresumed"]
            failed = str(run["failed"]) + (f" ({', '.join(f'{k}: {v}' for k, v in run['failed_detail'].items())})"
                                           if run["failed"] else "")
            lines.append(f"| {replicas} ({len(run['kills'])} kill{'s' * (len(run['kills']) > 1)}) | {run['streams']} | "
                         f"{failed} | {run['in_flight_at_kill']} | {run['resumed_by_server']:.0f} | "
                         f"{'yes' if run['resumed_identical'] else 'NO'} ({run['in_flight_identical']}/"
                         f"{run['in_flight_at_kill']} in flight identical) | "
                         f"{_ms(res['p50_ms'])} / {_ms(res['p95_ms'])}"
                         f" | {_ms(unres['p50_ms'])} / {_ms(unres['p95_ms'])} | {run['longest_gap_without_ok_s']:.1f} s"
                         f" | {run['longest_gap_without_token_s']:.1f} s |")
        two = resume["runs"].get("2")
        notes = []
        if two is not None:
            notes.append(f"target 0 failed with 2 replicas: {_met(two['failed'] == 0)}")
        notes.append("every resumed greedy stream identical to the recorded answer: "
                     + _met(all(r["resumed_identical"] for r in resume["runs"].values())))
        wrong = sum(r["wrong_texts"] for r in resume["runs"].values())
        notes.append(f"{wrong} completed stream(s) in all with a text other than the recorded one")
        if two is not None and two["latency_resumed"]["n"]:
            notes.append(f"with 2 replicas a resumed stream took {_ms(two['latency_resumed']['p50_ms'])} / "
                         f"{_ms(two['latency_resumed']['p95_ms'])} ms (p50 / p95) against "
                         f"{_ms(two['latency_unresumed']['p50_ms'])} / {_ms(two['latency_unresumed']['p95_ms'])} ms "
                         f"unresumed, its longest wait between two events {two['max_event_gap_resumed_s']:.2f} s")
        one = resume["runs"].get("1")
        if one is not None:
            notes.append(f"with 1 replica a resumed stream waits for the replacement replica (longest wait between "
                         f"two events {one['max_event_gap_resumed_s'] or 0:.1f} s)")
        lines += ["", "Reading: " + "; ".join(notes) + "."]

    sig = others.get("sigterm")
    if sig and "streams" in sig:
        head("SIGTERM to `llmstack deploy` with live streams", sig)
        shorts = [s for s in sig["streams"] if s["kind"] == "short"]
        longs = [s for s in sig["streams"] if s["kind"] == "long"]
        def outcome(group: list[dict[str, Any]]) -> str:
            return ", ".join(f"{v} {k}" for k, v in Counter(s["outcome"] for s in group).items())

        probes = sig["probes_by_status"]
        lines += ["", f"`{sig['deploy_command']}` in a subprocess (its own Ray cluster); {len(longs)} streams of "
                  f"{longs[0]['budget']} tokens (meant not to finish in the grace period) and {len(shorts)} of "
                  f"{shorts[0]['budget']} tokens, all in one batch, SIGTERM once "
                  f"every stream had begun; new requests sent every 0.1 s until the process exited. A stream *fits* "
                  "when its own pace (tokens per second over its life) puts its end within the grace period.", "",
                  "| grace period | streams that fit: completed | short streams | long streams | new requests during "
                  "the drain | exit status | SIGTERM to exit |", "|---|---|---|---|---|---|---|",
                  f"| {sig['grace_s']:g} s | {sig['fit_completed']} / {sig['fit']} | {outcome(shorts)} | "
                  f"{outcome(longs)} | {', '.join(f'{k}: {v}' for k, v in probes.items())} (503 with Retry-After: "
                  f"{sig['probes_503_with_retry_after']}, OpenAI shape: {sig['probes_503_openai_shape']}, codes "
                  f"{sig['probe_codes']}) | {sig['exit_status']} | {sig['exit_s']:.1f} s |"]
        ends = [s["ended_s"] for s in sig["streams"]]
        notes = [f"streams that fit completed: {_met(sig['fit_completed'] == sig['fit'])}",
                 f"streams cut without an error event and [DONE]: {sig['cut']}",
                 f"exit status 0 and no abort: {_met(sig['exit_status'] == 0 and not sig['aborted_in_log'])}",
                 f"streams ended {min(ends):.1f} to {max(ends):.1f} s after SIGTERM; the first 503 came "
                 + (f"{sig['first_503_s']:.2f} s after it" if sig["first_503_s"] is not None else "never")]
        by_drain = [s["ended_s"] for s in sig["streams"] if s["outcome"].startswith("error event")]
        if by_drain and sig["first_503_s"] is not None:
            notes.append(f"the streams the drain ended got their error event {max(by_drain):.2f} s after SIGTERM: the "
                         f"grace period counts from when the ingress began draining (its first 503 "
                         f"{sig['first_503_s']:.2f} s after SIGTERM), not from the signal")
        early = [p for p in sig["probe_other"] if p["status"] == 200]
        if early:
            notes.append(f"{len(early)} request(s) sent within {max(p['t'] for p in early):.2f} s of SIGTERM were "
                         "still served (200) before the drain reached the ingress")
        strays = [p for p in sig["probe_other"] if p["status"] not in (200, 503)]
        if strays:
            counts = {k: v for k, v in probes.items() if k not in ("0", "200", "503")}
            notes.append(f"**after the drain, while the process was still exiting, new requests got "
                         f"{', '.join(f'{v} x {k}' for k, v in counts.items())} not in the OpenAI shape and without "
                         f"Retry-After** (from {strays[0]['t']:.1f} s; Serve's proxy once the app is deleted, body "
                         f"{strays[0].get('body', '')[:80]!r}), then connection refused")
        lines += ["", "Reading: " + "; ".join(notes) + "."]

    over = others.get("overload")
    if over and "streams" in over:
        head(f"Overload: {over['streams']} concurrent streams", over)
        admitted = over["admitted"]
        share = over["admitted_completed"] / admitted if admitted else float("nan")
        lines += ["", f"{over['streams']} greedy streams of {over['max_tokens']} tokens (EOS ignored) opened at once "
                  "against one model replica with llmstack's serving defaults (max_ongoing_requests 32, "
                  "max_queued_requests 64, request_timeout_s 60, max_batch_size 8).", "",
                  "| by status | admitted (200) that finished | time to the first 503 | 504 / timeout events "
                  "| 503 with "
                  "Retry-After | errors in OpenAI shape | admitted: p50 / max time to finish |",
                  "|---|---|---|---|---|---|---|",
                  f"| {', '.join(f'{k}: {v}' for k, v in sorted(over['by_status'].items()))} | "
                  f"{over['admitted_completed']} / {admitted} ({share:.0%}) | "
                  f"{'never' if over['first_503_s'] is None else format(over['first_503_s'], '.2f') + ' s'} | "
                  f"{over['timeouts_504']} | {over['refused_with_retry_after']} / {over['by_status'].get('503', 0)} | "
                  f"{over['errors_openai_shape']} / {over['errors']} | "
                  f"{_s(over['admitted_latency_p50_s'])} / {_s(over['admitted_latency_max_s'])} |"]
        notes = [f"100% of admitted finish: {_met(admitted > 0 and over['admitted_completed'] == admitted)}",
                 f"no 504: {_met(over['timeouts_504'] == 0)}",
                 "every 503 with Retry-After: "
                 + _met(over["refused_with_retry_after"] == over["by_status"].get("503", 0)),
                 f"every error in the OpenAI shape: {_met(over['errors_openai_shape'] == over['errors'])}"]
        if over["admitted_ended_by_error"]:
            notes.append(f"admitted streams ended by an error event: {over['admitted_ended_by_error']}")
        if over["refusal_codes"]:
            notes.append("refusal codes " + ", ".join(f"`{k}` {v}" for k, v in over["refusal_codes"].items()))
        if over.get("refused_by"):
            notes.append("refused by " + ", ".join(f"{k}: {v}" for k, v in over["refused_by"].items()))
        lines += ["", "Reading: " + "; ".join(notes) + "."]

    metrics = others.get("metrics")
    if metrics and "scrapes_after" in metrics:
        head("/metrics across two ingress replicas", metrics)
        during = metrics["scrapes_during"]
        lines += ["", f"An app with `autoscaling.min_replicas: 2` (2 model and 2 ingress replicas); "
                  f"{metrics['requests_sent']} completions sent one after another over the first half of "
                  f"{len(during)} scrapes of `/metrics` (one every 0.5 s, through the load-balanced route), then "
                  f"{len(metrics['scrapes_after'])} more once the total had settled. Counted: "
                  "`llmstack_requests_total{route=\"completions\",status=\"200\"}` and "
                  "`vllm:e2e_request_latency_seconds_count`, summed over their series.", "",
                  "| scrapes during the load: monotonic | never above the requests sent | largest lag behind the "
                  "answers received | settled after the last answer | scrapes after: all equal to the requests sent "
                  "| values read after |", "|---|---|---|---|---|---|",
                  f"| {'yes' if metrics['monotonic_during'] and metrics['e2e_monotonic_during'] else 'NO'} | "
                  f"{'yes' if metrics['never_above_sent'] else 'NO'} | {metrics['max_lag_during']:.0f} requests | "
                  f"{_s(metrics['settled_after_load_s'])} | "
                  f"{'yes' if metrics['after_all_equal_sent'] else 'NO'} ({metrics['requests_ok']} ok sent) | "
                  f"{metrics['after_values']} / {metrics['after_e2e_values']} |"]
        totals = [r["requests_total"] for r in during]
        drops = [(a, b) for a, b in zip(totals, totals[1:]) if b < a]
        reading = ("monotonic and equal to the requests sent: "
                   + _met(metrics["monotonic_during"] and metrics["after_all_equal_sent"]))
        if drops:
            reading += (f"; while requests were being answered the total went backwards {len(drops)} time(s) (e.g. "
                        f"{drops[0][0]:.0f} then {drops[0][1]:.0f}): the replica that answers a scrape adds its own "
                        "live registry to the other replica's last export through Ray's metrics agent, so the two "
                        "replicas answer different totals until the export catches up (src/llmstack/serve/http/"
                        "cluster_metrics.py); once idle every scrape agreed")
        lines += ["", "Reading: " + reading + "."]
    if total_s is not None:
        lines += ["", f"The last run of the whole bench (every part, `python benchmarks/chaos_bench.py`) took "
                  f"{total_s / 60:.1f} min."]
    return lines


# --------------------------------------------------------------------------- main


PARTS = ("faults", "resume", "overload", "metrics", "sigterm")
PART_FILES = {"resume": "chaos_resume_streams", "overload": "chaos_overload200", "metrics": "chaos_metrics",
              "sigterm": "chaos_sigterm"}


def machine_facts() -> dict[str, Any]:
    import ray

    return {"cpus": os.cpu_count(), "cpu": cpu_name(), "python": platform.python_version(), "ray": ray.__version__,
            "load_avg_1m_at_start": os.getloadavg()[0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: shorter windows, no 2-replica app, no Train run")
    parser.add_argument("--part", default=",".join(PARTS),
                        help=f"comma-separated parts to run (default: all): {', '.join(PARTS)}")
    parser.add_argument("--threads", type=int, default=4, help="steady closed-loop HTTP clients")
    parser.add_argument("--only", default="", help="faults part: comma-separated scenario names (default: all)")
    parser.add_argument("--no-train", action="store_true", help="skip the Train worker kill")
    parser.add_argument("--drain-port", type=int, default=31400, help="HTTP port of the sigterm part's deploy")
    parser.add_argument("--out", default="chaos", help="results name: results/<out>.json (RESULTS.md only for chaos)")
    parser.add_argument("--render-only", action="store_true",
                        help="run nothing: write the RESULTS.md section from the results files")
    args = parser.parse_args()
    parts = set() if args.render_only else {name for name in args.part.split(",") if name}
    if parts - set(PARTS):
        parser.error(f"unknown part(s) {sorted(parts - set(PARTS))}; known: {', '.join(PARTS)}")
    t_begin = time.time()
    before_s, settle_s, max_wait_s = (2.0, 0.5, 25.0) if args.quick else (4.0, 3.0, 40.0)
    baseline_s = 3.0 if args.quick else 10.0
    only = {name for name in args.only.split(",") if name}
    suffix = " --quick" if args.quick else ""
    quick_suffix = "_quick" if args.quick else ""  # a smoke run's files: never read into RESULTS.md
    workdir = Path(tempfile.mkdtemp(prefix="chaos-bench-"))
    out_dir = workdir if args.quick else RESULTS  # a smoke run leaves benchmarks/results alone

    import ray
    from ray import serve

    import llmstack
    from llmstack.config import ReplicaAutoscalingConfig, ServeConfig
    from llmstack.serve._testing import make_registry
    from llmstack.serve.deployments import builder
    from llmstack.serve.deployments.builder import HEALTH_CHECK_PERIOD_S

    results: dict[str, Any] = {"machine": machine_facts(), "threads": args.threads,
                               "health_check_period_s": HEALTH_CHECK_PERIOD_S,
                               "config_summary": "num_cpus 0.5 and 1 torch thread per replica, max_batch_size 8, "
                                                 "max_ongoing_requests 16, max_queued_requests 16, response cache off, "
                                                 "request_timeout_s 30",
                               "scenarios": {}}
    rows: dict[str, dict[str, Any]] = results["scenarios"]
    part_results: dict[str, dict[str, Any]] = {}

    def part_row(part: str, started: float, **row: Any) -> dict[str, Any]:
        row.update(command=f"python benchmarks/chaos_bench.py --part {part}{suffix}", machine=machine_facts(),
                   wall_s=time.time() - started)
        part_results[part] = row
        write_json(out_dir / f"{PART_FILES[part]}{quick_suffix}.json", row, default=str)
        return row

    part_errors: dict[str, str] = {}

    def guarded(part: str, body: Callable[[], Any]) -> None:
        """Run one part; a failure is logged and reported at the end, and the other parts still run."""
        import traceback

        try:
            body()
        except Exception as exc:  # noqa: BLE001 - one broken part must not lose the others' figures
            part_errors[part] = f"{type(exc).__name__}: {exc}"
            log(f"{part} FAILED:\n{traceback.format_exc()}")

    if parts & {"faults", "resume", "overload", "metrics"}:
        # The dashboard serves the state API (replica pids here; Ray Train's placement-group cleaner).
        start_ray(4, object_store_memory=300_000_000, include_dashboard=True)
        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address  # other clusters run on this machine
        port = start_serve()
        info = make_registry(str(workdir / "registry"), adapters=0)
        common = {"registry": info["registry"].url, "model": "tiny-lm@production", "app_name": APP,
                  "http": {"port": port, "request_timeout_s": 30},
                  "engine": {"num_threads": 1, "max_batch_size": 8, "batch_wait_timeout_s": 0.005,
                             "response_cache_size": 0, "default_max_tokens": MAX_TOKENS, "max_tokens_limit": 256},
                  "deployment": {"max_ongoing_requests": 16, "max_queued_requests": 16,
                                 "ray_actor_options": {"num_cpus": 0.5}}}
        results["config"] = common

        def deploy(replicas: int) -> tuple[str, dict[str, str]]:
            cfg = ServeConfig(autoscaling=ReplicaAutoscalingConfig(min_replicas=replicas, max_replicas=replicas))
            log(f"deploying {APP} with {replicas} model replica(s) and {builder.ingress_replicas(cfg)} ingress "
                "replica(s)")
            app = llmstack.deploy({**common, "autoscaling": {"min_replicas": replicas, "max_replicas": replicas}},
                                  replace=True)
            answers = record_answers(app.url)
            warm = Load(app.url, answers, threads=args.threads).start()  # warm: batches of every size the load makes
            time.sleep(1.5 if args.quick else 3.0)
            warm.stop()
            return app.url, answers

        def run(scenario: Scenario, url: str, answers: dict[str, str]) -> None:
            if "faults" not in parts or (only and scenario.name not in only):
                return
            log(f"{scenario.name}: {scenario.label}")
            rows[scenario.name] = run_scenario(scenario, url, answers, threads=args.threads, before_s=before_s,
                                               settle_s=settle_s, max_wait_s=max_wait_s)
            log("   " + progress_line(rows[scenario.name]))

        resume_rows: dict[str, Any] = {}

        def resume(url: str, replicas: int, kills: int) -> None:
            started = time.time()
            log(f"resume: greedy streaming clients, the model replica SIGKILLed {kills}x ({replicas} replica(s))")
            stream_answers = record_stream_answers(url)
            resume_rows[str(replicas)] = resume_under_kill(url, stream_answers, replicas=replicas, threads=6,
                                                           kills=kills, before_s=before_s, settle_s=settle_s)
            resume_rows[str(replicas)]["wall_s"] = time.time() - started
            log("   " + json.dumps({k: v for k, v in resume_rows[str(replicas)].items() if k != "kills"},
                                  default=str))

        if parts & {"faults", "resume"}:
            url, answers = deploy(1)
            results["reference_answers"] = answers
            overload_s = 3.0 if args.quick else 8.0
            overload_clients = 9 * args.threads  # 10x the clients in all

            def overload() -> dict[str, Any]:
                time.sleep(overload_s)
                return {"overload_clients": overload_clients}

            def disconnects() -> dict[str, Any]:
                cancelled = engine_stats().get("cancelled", 0)
                facts = stream_disconnects(url, threads=4, seconds=3.0 if args.quick else 8.0)
                time.sleep(1.0)
                facts["engine_cancelled"] = engine_stats().get("cancelled", 0) - cancelled
                return facts

            if "faults" in parts and (not only or "baseline" in only):
                log("baseline: the same load, no fault")
                rows["baseline"] = run_scenario(Scenario("baseline", "baseline"), url, answers,
                                                threads=args.threads, before_s=0.0, settle_s=baseline_s,
                                                max_wait_s=0.0)
            run(Scenario("model_kill_1", "model replica killed (1 replica)", lambda: kill_replica("LLMServer"),
                         watch="LLMServer"), url, answers)
            run(Scenario("ingress_kill", "ingress replica killed", lambda: kill_replica("OpenAIIngress"),
                         watch="OpenAIIngress"), url, answers)
            run(Scenario("stream_disconnect", "streaming clients disconnect", disconnects), url, answers)
            run(Scenario("overload", f"overload: {10 * args.threads} clients (10x) for {overload_s:g} s", overload,
                         extra_load=lambda: Load(url, answers, threads=overload_clients, kind="overload")),
                url, answers)
            if "resume" in parts:
                started = time.time()
                guarded("resume", lambda: resume(url, 1, 1))
            two_faults = "faults" in parts and ((not only and not args.quick) or only & {"model_kill_2",
                                                                                          "ingress_kill_2"})
            if two_faults or ("resume" in parts and not args.quick):
                url, answers2 = deploy(2)
                if answers2 != answers:
                    results["answers_differ_between_deployments"] = True
                if "resume" in parts:
                    guarded("resume", lambda: resume(url, 2, 2))
                run(Scenario("model_kill_2", "model replica killed (min_replicas 2)",
                             lambda: kill_replica("LLMServer"), watch="LLMServer"), url, answers2)
                run(Scenario("ingress_kill_2", "ingress replica killed (min_replicas 2: 2 ingress replicas)",
                             lambda: kill_replica("OpenAIIngress"), watch="OpenAIIngress"), url, answers2)
            if "resume" in parts and resume_rows:
                part_row("resume", started, runs=resume_rows, stream_tokens=STREAM_TOKENS, threads=6)

        def overload_part() -> None:
            started = time.time()
            # llmstack's own serving defaults (max_ongoing_requests 32, max_queued_requests 64, request_timeout_s
            # 60, max_batch_size 8), one replica: the setup of issue #26's overload finding
            overload_config = {"registry": common["registry"], "model": common["model"], "app_name": APP,
                               "http": {"port": port}, "engine": {"num_threads": 1, "response_cache_size": 0},
                               "deployment": {"ray_actor_options": {"num_cpus": 0.5}}}
            log(f"overload: {OVERLOAD_STREAMS} concurrent streams on one replica with the serving defaults")
            app = llmstack.deploy(overload_config, replace=True)
            with __import__("requests").Session() as session:
                for i in range(4):
                    session.post(app.url + "/v1/completions", json={"prompt": "warm", "max_tokens": 16, "seed": i},
                                 timeout=60).raise_for_status()
            tokens = OVERLOAD_TOKENS // 2 if args.quick else OVERLOAD_TOKENS
            row = overload_streams(app.url, streams=OVERLOAD_STREAMS, max_tokens=tokens)
            part_row("overload", started, config=overload_config, **row)
            log("   " + json.dumps(row, default=str))

        def metrics_part() -> None:
            started = time.time()
            serve.delete(APP)
            log("metrics: /metrics scraped across two ingress replicas (autoscaling.min_replicas 2)")
            metrics_app = llmstack.deploy({**common, "app_name": f"{APP}-metrics",
                                           "http": {**common["http"], "route_prefix": f"/{APP}-metrics"},
                                           "autoscaling": {"min_replicas": 2, "max_replicas": 2}}, replace=True)
            scrapes = 10 if args.quick else 20
            row = metrics_scrapes(metrics_app.url, requests_sent=50, scrapes=scrapes, period_s=0.5)
            part_row("metrics", started, ingress_replicas=2, model_replicas=2, **row)
            log("   " + json.dumps({k: v for k, v in row.items() if not k.startswith("scrapes")}, default=str))
            serve.delete(f"{APP}-metrics")

        if "overload" in parts:
            guarded("overload", overload_part)
        if "metrics" in parts:
            guarded("metrics", metrics_part)
        for name in (APP, f"{APP}-metrics"):
            if name in serve.status().applications:
                serve.delete(name)
        if "faults" in parts and not args.no_train and not args.quick and (not only or "train" in only):
            log("train: a Ray Train worker killed mid-run")
            results["train"] = train_kill(workdir, steps=8, fault_at=5, checkpoint_every=3)
            log("   " + json.dumps(results["train"], default=str))
        serve.shutdown()
        ray.shutdown()
        os.environ.pop("RAY_ADDRESS", None)
    def sigterm_part() -> None:
        started = time.time()
        log("sigterm: `llmstack deploy` (its own Ray cluster) drained with live streams")
        row = sigterm_drain(workdir, port=args.drain_port, grace_s=0.5, short_streams=5, long_streams=3)
        part_row("sigterm", started, **row)
        log("   " + json.dumps({k: v for k, v in row.items() if k not in ("log_tail", "streams")}, default=str))

    if "sigterm" in parts:
        guarded("sigterm", sigterm_part)
    results["wall_s"] = time.time() - t_begin
    if "faults" in parts:
        results["plotted"] = bool(rows) and plot_timelines(rows, out_dir / f"{args.out}{quick_suffix}_timeline.png")
        results["command"] = "python benchmarks/chaos_bench.py --part faults" + suffix
        if parts == set(PARTS):
            results["all_parts_wall_s"] = results["wall_s"]
        else:  # keep the whole bench's last time in the faults file
            results["all_parts_wall_s"] = (_read_json(RESULTS / "chaos.json") or {}).get("all_parts_wall_s")
        write_json(out_dir / f"{args.out}{quick_suffix}.json", results, default=str)
    if args.out == "chaos" and not only and not args.quick:
        faults = results if "faults" in parts else _read_json(RESULTS / "chaos.json")
        others = {part: part_results.get(part) or _read_json(RESULTS / f"{file}.json")
                  for part, file in PART_FILES.items()}
        if faults is not None and "baseline" in faults.get("scenarios", {}):
            full = parts == set(PARTS)
            total_s = results["wall_s"] if full else faults.get("all_parts_wall_s")
            # the header names the whole bench and its last time; each part below names its own command
            write_section("chaos", report({**faults, "wall_s": total_s or faults["wall_s"]},
                                          "python benchmarks/chaos_bench.py" if total_s else faults.get(
                                              "command", "python benchmarks/chaos_bench.py --part faults"),
                                          bool(faults.get("plotted", True)), others, total_s=total_s))
    log(f"done in {results['wall_s']:.0f} s; results in {out_dir}"
        + (f"; parts that failed: {part_errors}" if part_errors else ""))
    return 1 if part_errors else 0


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


if __name__ == "__main__":
    sys.exit(main())
