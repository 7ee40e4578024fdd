"""Chaos benchmark: faults under steady HTTP load, and what each one costs (issue #12).

Measured in one run, on one machine, on the real stack (a tiny registered model, ``llmstack.deploy()``
on a real Serve app, real HTTP from local client threads), each scenario next to a baseline of the same
load with no fault:

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

Writes benchmarks/results/chaos.json, chaos_timeline.png and the ``## chaos`` section of benchmarks/RESULTS.md.

Reproduce: python benchmarks/chaos_bench.py            (about 7 minutes on 2 CPU cores)
           python benchmarks/chaos_bench.py --quick    (smoke run, about 2 minutes: shorter windows,
                                                        no 2-replica app, no Train run)
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
from harness.loadgen import ClosedLoop, post_completion
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


def report(results: dict[str, Any], command: str, plotted: bool) -> str:
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
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: shorter windows, no 2-replica app, no Train run")
    parser.add_argument("--threads", type=int, default=4, help="steady closed-loop HTTP clients")
    parser.add_argument("--only", default="", help="comma-separated scenario names (default: all)")
    parser.add_argument("--no-train", action="store_true", help="skip the Train worker kill")
    parser.add_argument("--out", default="chaos", help="results name: results/<out>.json (RESULTS.md only for chaos)")
    args = parser.parse_args()
    t_begin = time.time()
    before_s, settle_s, max_wait_s = (2.0, 0.5, 25.0) if args.quick else (4.0, 3.0, 40.0)
    baseline_s = 3.0 if args.quick else 10.0
    only = {name for name in args.only.split(",") if name}

    import ray
    from ray import serve

    import llmstack
    from llmstack.config import ReplicaAutoscalingConfig, ServeConfig
    from llmstack.serve._testing import make_registry
    from llmstack.serve.deployments import builder
    from llmstack.serve.deployments.builder import HEALTH_CHECK_PERIOD_S

    # The dashboard serves the state API (replica pids here; Ray Train's placement-group cleaner).
    start_ray(4, object_store_memory=300_000_000, include_dashboard=True)
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address  # other clusters run on this machine
    port = start_serve()
    workdir = Path(tempfile.mkdtemp(prefix="chaos-bench-"))
    info = make_registry(str(workdir / "registry"), adapters=0)
    common = {"registry": info["registry"].url, "model": "tiny-lm@production", "app_name": APP,
              "http": {"port": port, "request_timeout_s": 30},
              "engine": {"num_threads": 1, "max_batch_size": 8, "batch_wait_timeout_s": 0.005, "response_cache_size": 0,
                         "default_max_tokens": MAX_TOKENS, "max_tokens_limit": 256},
              "deployment": {"max_ongoing_requests": 16, "max_queued_requests": 16,
                             "ray_actor_options": {"num_cpus": 0.5}}}
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "cpu": cpu_name(), "python": platform.python_version(),
                    "ray": ray.__version__, "load_avg_1m_at_start": os.getloadavg()[0]},
        "threads": args.threads, "health_check_period_s": HEALTH_CHECK_PERIOD_S,
        "config_summary": "num_cpus 0.5 and 1 torch thread per replica, max_batch_size 8, max_ongoing_requests 16, "
                          "max_queued_requests 16, response cache off, request_timeout_s 30",
        "config": common, "scenarios": {}}
    rows: dict[str, dict[str, Any]] = results["scenarios"]

    def deploy(replicas: int) -> tuple[str, dict[str, str]]:
        cfg = ServeConfig(autoscaling=ReplicaAutoscalingConfig(min_replicas=replicas, max_replicas=replicas))
        log(f"deploying {APP} with {replicas} model replica(s) and {builder.ingress_replicas(cfg)} ingress replica(s)")
        # build_app reads INGRESS_OPTIONS in this process: patching it tries a proposed change without editing src.
        app = llmstack.deploy({**common, "autoscaling": {"min_replicas": replicas, "max_replicas": replicas}},
                              replace=True)
        answers = record_answers(app.url)
        warm = Load(app.url, answers, threads=args.threads).start()  # warm: batches of every size the load makes
        time.sleep(1.5 if args.quick else 3.0)
        warm.stop()
        return app.url, answers

    def run(scenario: Scenario, url: str, answers: dict[str, str]) -> None:
        if only and scenario.name not in only:
            return
        log(f"{scenario.name}: {scenario.label}")
        rows[scenario.name] = run_scenario(scenario, url, answers, threads=args.threads, before_s=before_s,
                                           settle_s=settle_s, max_wait_s=max_wait_s)
        log("   " + progress_line(rows[scenario.name]))

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

    baseline = Scenario("baseline", "baseline")
    if not only or "baseline" in only:
        log("baseline: the same load, no fault")
        rows["baseline"] = run_scenario(baseline, url, answers, threads=args.threads, before_s=0.0,
                                        settle_s=baseline_s, max_wait_s=0.0)
    run(Scenario("model_kill_1", "model replica killed (1 replica)", lambda: kill_replica("LLMServer"),
                 watch="LLMServer"), url, answers)
    run(Scenario("ingress_kill", "ingress replica killed", lambda: kill_replica("OpenAIIngress"),
                 watch="OpenAIIngress"), url, answers)
    run(Scenario("stream_disconnect", "streaming clients disconnect", disconnects), url, answers)
    run(Scenario("overload", f"overload: {10 * args.threads} clients (10x) for {overload_s:g} s", overload,
                 extra_load=lambda: Load(url, answers, threads=overload_clients, kind="overload")), url, answers)
    if (not only and not args.quick) or only & {"model_kill_2", "ingress_kill_2"}:
        url, answers2 = deploy(2)
        if answers2 != answers:
            results["answers_differ_between_deployments"] = True
        run(Scenario("model_kill_2", "model replica killed (min_replicas 2)", lambda: kill_replica("LLMServer"),
                     watch="LLMServer"), url, answers2)
        run(Scenario("ingress_kill_2", "ingress replica killed (min_replicas 2: 2 ingress replicas)",
                     lambda: kill_replica("OpenAIIngress"), watch="OpenAIIngress"), url, answers2)
    serve.delete(APP)

    if not args.no_train and not args.quick and (not only or "train" in only):
        log("train: a Ray Train worker killed mid-run")
        results["train"] = train_kill(workdir, steps=8, fault_at=5, checkpoint_every=3)
        log("   " + json.dumps(results["train"], default=str))
    serve.shutdown()
    ray.shutdown()
    results["wall_s"] = time.time() - t_begin
    write_json(RESULTS / f"{args.out}.json", results, default=str)
    plotted = bool(rows) and plot_timelines(rows, RESULTS / f"{args.out}_timeline.png")
    command = "python benchmarks/chaos_bench.py" + (" --quick" if args.quick else "")
    if args.out == "chaos" and not only and "baseline" in rows:
        write_section("chaos", report(results, command, plotted))
    log(f"done in {results['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
