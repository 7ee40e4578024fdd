"""A discrete-event simulator of a Serve deployment under a trace, driving the real policy functions.

The replica model follows llmstack's engine: up to ``max_batch_size`` sequences per replica, a new
request's prompt is prefilled in one forward pass (prefill first), then every active sequence gains one
token per decode step; requests beyond a replica's batch wait in its queue (up to ``max_ongoing_requests``)
and then at the handle (up to ``max_queued_requests``, beyond that 503). Replicas start ``startup_s`` after
the decision and drain their requests before stopping.

The control loop is Serve's: every ``control_interval_s`` it builds a context (ongoing requests averaged
over ``look_back_period_s``, sampled every ``metrics_interval_s``), calls the policy — Ray's own
``replica_queue_length_autoscaling_policy`` for ``reactive``, :class:`PredictivePolicy` for ``predictive`` —
and applies the cold-start path, the up/down-scale delays and ``min/max_replicas`` as Serve's wrapper does.
Everything runs on a simulated clock: the whole hour of a trace takes seconds.
Calibration (measuring a :class:`ReplicaModel`, a replica's capacity at the SLO) is in ``calibration.py``.

Kept as one module (~550 lines): the event queue, the replicas and the control loop all act on one
simulation's state on one clock; split apart, each piece would reach into the others' fields.

Example:
    >>> from llmstack.autoscale.trace import synthetic_trace
    >>> from llmstack.config import ReplicaAutoscalingConfig
    >>> result = simulate(synthetic_trace([(60, 2.0)]), ReplicaAutoscalingConfig(max_replicas=3),
    ...                   policy="reactive")
    >>> 0 < result.metrics["slo_attainment"] <= 1
    True
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from collections import deque
from collections.abc import Callable
from typing import Any, Literal

from llmstack.autoscale.policy import LoadCounters, PredictivePolicy, serve_autoscaling_config
from llmstack.autoscale.trace import Trace
from llmstack.config import ReplicaAutoscalingConfig
from llmstack.errors import ConfigError

PolicyName = Literal["static", "reactive", "predictive"]
POLICIES: tuple[str, ...] = ("static", "reactive", "predictive")
CONTROL_INTERVAL_S = 0.1  # Ray Serve's RAY_SERVE_CONTROL_LOOP_INTERVAL_S default


@dataclasses.dataclass(frozen=True)
class ReplicaModel:
    """Costs of one model replica, measured on the engine
    (see ``llmstack.serve.engine.calibration.calibrate_replica_model``)."""

    prefill_tokens_per_s: float  # prompt tokens per second in one prefill pass
    decode_step_s: float  # one decode step with one sequence
    decode_step_per_seq_s: float  # extra time per additional sequence in a decode step
    startup_s: float  # from the scale-up decision to serving requests
    prefill_overhead_s: float = 0.0  # fixed cost of a prefill pass
    request_overhead_s: float = 0.0  # proxy and ingress hops, added to TTFT and latency
    max_batch_size: int = 8  # sequences decoded together
    max_ongoing_requests: int = 32  # per replica (Serve's limit)
    max_queued_requests: int = 64  # at the handle; beyond it requests are shed (-1: unbounded)
    prefill_token_budget: int = 4096  # prompt tokens admitted to one prefill pass (at least one request)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def scaled(self, capacity_scale: float, *, startup_s: float | None = None) -> ReplicaModel:
        """This replica with its compute rates times ``capacity_scale`` (start-up: ``startup_s`` or unchanged).

        ``capacity_scale`` 0.25 is a replica four times slower: a quarter of the prefill tokens/s and four
        times the decode step and per-pass overheads (a larger model, or the same model on a smaller
        accelerator). Batch size, queue limits and the per-request HTTP overhead stay as they are.

        Example:
            >>> DEFAULT_REPLICA_MODEL.scaled(0.5).prefill_tokens_per_s
            5000.0
        """
        if not capacity_scale > 0:
            raise ConfigError(f"capacity_scale: must be > 0, got {capacity_scale}")
        s = capacity_scale
        return dataclasses.replace(self, prefill_tokens_per_s=self.prefill_tokens_per_s * s,
                                   decode_step_s=self.decode_step_s / s,
                                   decode_step_per_seq_s=self.decode_step_per_seq_s / s,
                                   prefill_overhead_s=self.prefill_overhead_s / s,
                                   startup_s=self.startup_s if startup_s is None else startup_s)


@dataclasses.dataclass
class _Request:
    index: int
    arrival: float
    context: int
    output: int
    remaining: int = 0
    first_token: float | None = None
    finish: float | None = None
    status: int = 200


@dataclasses.dataclass
class _Replica:
    id: int
    created: float
    ready_at: float
    state: str = "starting"  # starting | running | draining | stopped
    stopped: float | None = None
    busy_until: float | None = None
    busy_time: float = 0.0
    queue: deque = dataclasses.field(default_factory=deque)
    prefill: list = dataclasses.field(default_factory=list)
    active: list = dataclasses.field(default_factory=list)
    phase: str = ""  # what the running iteration is: prefill | decode

    @property
    def ongoing(self) -> int:
        return len(self.queue) + len(self.prefill) + len(self.active)


@dataclasses.dataclass
class SimContext:
    """The fields of Ray Serve's ``AutoscalingContext`` the policies read, plus ``load_counters``."""

    deployment_name: str
    current_num_replicas: int
    target_num_replicas: int
    total_num_requests: float
    total_queued_requests: float
    capacity_adjusted_min_replicas: int
    capacity_adjusted_max_replicas: int
    policy_state: dict[str, Any]
    current_time: float
    config: Any
    load_counters: LoadCounters | None = None
    app_name: str | None = "simulated"
    running_replicas: list = dataclasses.field(default_factory=list)
    aggregated_metrics: dict = dataclasses.field(default_factory=dict)
    raw_metrics: dict = dataclasses.field(default_factory=dict)
    last_scale_up_time: float | None = None
    last_scale_down_time: float | None = None


class ServeDelays:
    """Serve's up/down-scale delay rule on an explicit clock (what its policy wrapper applies).

    A change of direction resets the timer; a decision is applied once it has been wanted for the delay.
    Scaling 1 -> 0 uses ``downscale_to_zero_delay_s`` when set; other downscales never go below 1.
    """

    def __init__(self, upscale_delay_s: float, downscale_delay_s: float,
                 downscale_to_zero_delay_s: float | None = None) -> None:
        self.upscale_delay_s = upscale_delay_s
        self.downscale_delay_s = downscale_delay_s
        self.downscale_to_zero_delay_s = downscale_to_zero_delay_s
        self.direction = 0  # >0 wanting up, <0 wanting down
        self.since: float | None = None

    def apply(self, desired: int, target: int, now: float) -> int:
        if desired == target:
            self.direction, self.since = 0, None
            return target
        up = desired > target
        if (self.direction > 0) != up or self.direction == 0:
            self.direction, self.since = (1 if up else -1), now
        if up:
            delay = self.upscale_delay_s
        elif target == 1:
            delay = self.downscale_to_zero_delay_s if self.downscale_to_zero_delay_s is not None \
                else self.downscale_delay_s
        else:
            delay = self.downscale_delay_s
            desired = max(1, desired)
        if now - self.since + 1e-6 >= delay:
            self.direction, self.since = 0, None
            return desired
        return target


@dataclasses.dataclass
class SimulationResult:
    """Metrics, per-request records and a per-second timeline of one simulated run."""

    policy: str
    metrics: dict[str, Any]
    requests: list[dict[str, Any]]
    timeline: dict[str, list[float]]
    decisions: list[Any] = dataclasses.field(default_factory=list, repr=False)


def simulate(trace: Trace, auto: ReplicaAutoscalingConfig, *, policy: PolicyName | Callable[[Any], Any] = "predictive",
             replica_model: ReplicaModel | None = None, static_replicas: int | None = None,
             control_interval_s: float = CONTROL_INTERVAL_S, drain_s: float = 120.0,
             progress: bool = False) -> SimulationResult:
    """Replay ``trace`` against a simulated deployment scaled by ``policy``; deterministic.

    Args:
        trace: the requests (arrival offsets and token counts).
        auto: the autoscaling config (bounds, delays, SLO, predictive parameters).
        policy: ``static`` (``static_replicas``, default ``max_replicas``), ``reactive`` (Ray's default
            queue-depth policy), ``predictive`` (:class:`PredictivePolicy`), or any callable with Serve's
            policy signature ``f(ctx) -> (replicas, state)`` (named by its ``name`` attribute, else
            ``custom``; Serve's delays of ``auto`` apply to it as to ``reactive``), e.g. a reference policy
            that knows the trace's future.
        replica_model: replica costs; the default is a small CPU replica.
        drain_s: how long after the last arrival unfinished requests may run.

    Returns:
        A :class:`SimulationResult`; ``metrics`` has replica_seconds, idle_replica_seconds, utilization,
        slo_attainment, scale_events and more.

    Example:
        >>> simulate(trace, ReplicaAutoscalingConfig(max_replicas=4, policy="predictive"))  # doctest: +SKIP
    """
    custom = None
    if callable(policy):
        custom, policy = policy, str(getattr(policy, "name", "custom"))
    elif policy not in POLICIES:
        raise ConfigError(f"policy: unknown policy {policy!r}; known: {', '.join(POLICIES)}")
    model = replica_model or DEFAULT_REPLICA_MODEL
    return _Simulation(trace, auto, policy, model, static_replicas, control_interval_s, drain_s, progress,
                       custom).run()


DEFAULT_REPLICA_MODEL = ReplicaModel(prefill_tokens_per_s=10_000.0, decode_step_s=0.0015,
                                     decode_step_per_seq_s=0.0002, startup_s=5.0, prefill_overhead_s=0.003,
                                     request_overhead_s=0.02)


class _Simulation:
    def __init__(self, trace: Trace, auto: ReplicaAutoscalingConfig, policy: str, model: ReplicaModel,
                 static_replicas: int | None, control_interval_s: float, drain_s: float, progress: bool,
                 custom: Callable[[Any], Any] | None = None) -> None:
        self.trace, self.auto, self.policy_name, self.model = trace, auto, policy, model
        self.control_interval_s, self.drain_s, self.progress = control_interval_s, drain_s, progress
        self.serve_config = serve_autoscaling_config(auto)
        self.events: list[tuple[float, int, str, Any]] = []
        self.seq = 0
        self.replicas: list[_Replica] = []
        self.handle_queue: deque[_Request] = deque()
        self.requests = [_Request(i, t, c, g) for i, (t, c, g) in
                         enumerate(zip(trace.arrival_s, trace.context_tokens, trace.generated_tokens))]
        self.arrived = 0
        self.arrived_tokens = 0.0
        self.samples: deque[tuple[float, float]] = deque()
        self.counters: LoadCounters | None = None
        self.completed = 0
        self.completed_tokens = 0.0
        self.scale_events = 0
        self.rejected = 0
        self.policy_state: dict[str, Any] = {}
        self.timeline: dict[str, list[float]] = {k: [] for k in
                                                 ("time", "target", "running", "ongoing", "arrivals", "tokens")}
        self._second_arrivals = 0
        self._second_tokens = 0.0
        if policy == "static":
            count = static_replicas or auto.max_replicas
            self.low = self.high = count
            self.target = count
            self.policy: Callable[[Any], tuple[Any, dict]] | None = None
        else:
            self.low, self.high = auto.min_replicas, auto.max_replicas
            self.target = self.serve_config["initial_replicas"]
            self.policy = custom or self._make_policy()
        self.delays = ServeDelays(self.serve_config["upscale_delay_s"], self.serve_config["downscale_delay_s"])
        self.ray_config = self._ray_config()

    def _make_policy(self) -> Callable[[Any], tuple[Any, dict]]:
        if self.policy_name == "predictive":
            policy = PredictivePolicy(**self.serve_config["policy"]["policy_kwargs"])
            policy.log_decisions = False
            return policy
        from ray.serve.autoscaling_policy import replica_queue_length_autoscaling_policy

        return replica_queue_length_autoscaling_policy

    def _ray_config(self) -> Any:
        """Ray's own AutoscalingConfig built from the dict Serve gets (it validates that dict, too)."""
        from ray.serve.config import AutoscalingConfig as RayAutoscalingConfig

        fields = {k: v for k, v in self.serve_config.items() if k != "policy"}
        if self.policy_name == "static":
            fields.update(min_replicas=self.target, max_replicas=self.target, initial_replicas=self.target)
        return RayAutoscalingConfig(**fields)

    # ------------------------------------------------------------------ event plumbing

    def push(self, when: float, kind: str, payload: Any = None) -> None:
        self.seq += 1
        heapq.heappush(self.events, (when, self.seq, kind, payload))

    def run(self) -> SimulationResult:
        for _ in range(self.target):
            self._add_replica(0.0, ready_now=True)
        end = (self.trace.arrival_s[-1] if self.requests else 0.0) + self.drain_s
        for r in self.requests:
            self.push(r.arrival, "arrival", r)
        self.push(0.0, "tick")
        self.push(0.0, "sample")
        self.push(1.0, "second")
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=len(self.requests), desc=f"simulate {self.policy_name}", unit="req", leave=False)
        now = 0.0
        finished = 0
        while self.events:
            now, _, kind, payload = heapq.heappop(self.events)
            if now > end:
                break
            if kind == "arrival":
                self._arrive(payload, now)
                if bar is not None:
                    bar.update(1)
            elif kind == "iteration":
                finished += self._finish_iteration(payload, now)
            elif kind == "ready":
                self._ready(payload, now)
            elif kind == "tick":
                self._tick(now)
                if self.arrived < len(self.requests) or finished < len(self.requests):
                    self.push(now + self.control_interval_s, "tick")
            elif kind == "sample":
                self._sample(now)
                if self.arrived < len(self.requests) or finished < len(self.requests):
                    self.push(now + self.auto.metrics_interval_s, "sample")
            elif kind == "second":
                self._record_second(now)
                if self.arrived < len(self.requests) or finished < len(self.requests):
                    self.push(now + 1.0, "second")
            if self.arrived == len(self.requests) and finished + self.rejected >= len(self.requests):
                break
        if bar is not None:
            bar.close()
        return self._result(now)

    # ------------------------------------------------------------------ requests and replicas

    def _arrive(self, request: _Request, now: float) -> None:
        self.arrived += 1
        self.arrived_tokens += request.context + request.output
        self._second_arrivals += 1
        self._second_tokens += request.context + request.output
        limit = self.model.max_queued_requests
        if not self._route(request, now):
            if limit >= 0 and len(self.handle_queue) >= limit:
                request.status = 503
                self.rejected += 1
                return
            self.handle_queue.append(request)

    def _route(self, request: _Request, now: float) -> bool:
        """Give ``request`` to the least-loaded running replica with room; False when none has room."""
        best = None
        for replica in self.replicas:
            if replica.state == "running" and replica.ongoing < self.model.max_ongoing_requests:
                if best is None or replica.ongoing < best.ongoing:
                    best = replica
        if best is None:
            return False
        best.queue.append(request)
        if best.busy_until is None:
            self._start_iteration(best, now)
        return True

    def _dispatch(self, now: float) -> None:
        while self.handle_queue and self._route(self.handle_queue[0], now):
            self.handle_queue.popleft()

    def _start_iteration(self, replica: _Replica, now: float) -> None:
        m = self.model
        budget = m.prefill_token_budget
        while replica.queue and len(replica.prefill) + len(replica.active) < m.max_batch_size:
            if replica.prefill and replica.queue[0].context > budget:
                break
            budget -= replica.queue[0].context
            replica.prefill.append(replica.queue.popleft())
        if replica.prefill:
            duration = m.prefill_overhead_s + sum(r.context for r in replica.prefill) / m.prefill_tokens_per_s
            replica.phase = "prefill"
        elif replica.active:
            duration = m.decode_step_s + m.decode_step_per_seq_s * (len(replica.active) - 1)
            replica.phase = "decode"
        else:
            replica.busy_until = None
            if replica.state == "draining":
                replica.state, replica.stopped = "stopped", now
            return
        replica.busy_until = now + duration
        replica.busy_time += duration
        self.push(replica.busy_until, "iteration", replica)

    def _finish_iteration(self, replica: _Replica, now: float) -> int:
        done = 0
        if replica.phase == "prefill":
            for request in replica.prefill:
                request.first_token = now
                request.remaining = request.output - 1
                replica.active.append(request)
            replica.prefill = []
        else:
            for request in replica.active:
                request.remaining -= 1
        still = []
        for request in replica.active:
            if request.remaining <= 0:
                request.finish = now
                done += 1
                self.completed += 1
                self.completed_tokens += request.context + request.output
            else:
                still.append(request)
        replica.active = still
        replica.busy_until = None
        self._start_iteration(replica, now)
        if done:
            self._dispatch(now)
        return done

    def _add_replica(self, now: float, *, ready_now: bool = False) -> None:
        ready_at = now if ready_now else now + self.model.startup_s
        replica = _Replica(id=len(self.replicas), created=now, ready_at=ready_at)
        self.replicas.append(replica)
        if ready_now:
            replica.state = "running"
        else:
            self.push(ready_at, "ready", replica)

    def _ready(self, replica: _Replica, now: float) -> None:
        if replica.state == "starting":
            replica.state = "running"
            self._dispatch(now)

    def _scale_to(self, target: int, now: float) -> None:
        live = [r for r in self.replicas if r.state in ("starting", "running")]
        for _ in range(target - len(live)):
            self._add_replica(now)
        excess = len(live) - target
        if excess <= 0:
            return
        starting = sorted((r for r in live if r.state == "starting"), key=lambda r: -r.created)
        running = sorted((r for r in live if r.state == "running"), key=lambda r: (r.ongoing, -r.id))
        for replica in (starting + running)[:excess]:
            if replica.state == "starting" or replica.ongoing == 0:
                replica.state, replica.stopped = "stopped", now
            else:
                replica.state = "draining"

    # ------------------------------------------------------------------ control loop

    def _ongoing(self) -> int:
        return len(self.handle_queue) + sum(r.ongoing for r in self.replicas if r.state in ("running", "draining"))

    def _sample(self, now: float) -> None:
        self.samples.append((now, float(self._ongoing())))
        while self.samples and self.samples[0][0] < now - self.auto.look_back_period_s:
            self.samples.popleft()
        # What the live policy reads from /metrics: arrivals (finished + in flight), and the tokens of the
        # finished requests only (a request's output length is not known before it finishes).
        self.counters = LoadCounters(time=now, requests=float(self.arrived), tokens=self.completed_tokens,
                                     completed=float(self.completed))

    def _tick(self, now: float) -> None:
        if self.policy is None:
            return
        running = sum(r.state == "running" for r in self.replicas)
        ongoing = sum(v for _, v in self.samples) / len(self.samples) if self.samples else 0.0
        ctx = SimContext(deployment_name="LLMServer", current_num_replicas=running, target_num_replicas=self.target,
                         total_num_requests=ongoing, total_queued_requests=float(len(self.handle_queue)),
                         capacity_adjusted_min_replicas=self.low, capacity_adjusted_max_replicas=self.high,
                         policy_state=dict(self.policy_state), current_time=now, config=self.ray_config,
                         load_counters=self.counters)
        if running == 0 and ctx.total_num_requests > 0:  # Serve's cold-start path skips the delays
            decision = max(1, self.target)
        else:
            desired, state = self.policy(ctx)
            self.policy_state = dict(state or {})
            desired = math.ceil(desired)
            decision = desired if running == 0 and desired > 0 else self.delays.apply(max(0, desired), self.target, now)
        decision = max(self.low, min(self.high, decision))
        if decision != self.target:
            self.scale_events += 1
            self.target = decision
        self._scale_to(self.target, now)

    def _record_second(self, now: float) -> None:
        t = self.timeline
        t["time"].append(now)
        t["target"].append(self.target)
        t["running"].append(sum(r.state == "running" for r in self.replicas))
        t["ongoing"].append(self._ongoing())
        t["arrivals"].append(self._second_arrivals)
        t["tokens"].append(self._second_tokens)
        self._second_arrivals, self._second_tokens = 0, 0.0

    # ------------------------------------------------------------------ results

    def _result(self, end: float) -> SimulationResult:
        overhead = self.model.request_overhead_s
        slo = self.auto.predictive.ttft_slo_s
        records = []
        met = 0
        ttfts = []
        for r in self.requests:
            ttft = None if r.first_token is None else r.first_token - r.arrival + overhead
            latency = None if r.finish is None else r.finish - r.arrival + overhead
            status = r.status if r.status != 200 or r.finish is not None else 504
            if ttft is not None and status == 200:
                ttfts.append(ttft)
                met += ttft <= slo
            records.append({"arrival_s": r.arrival, "ttft_s": ttft, "latency_s": latency, "status": status})
        # Replica time runs from the scale-up decision (start-up included: the accelerator is held) to the
        # replica's stop (drain included); busy time is the time a forward pass (prefill or decode step) ran.
        replica_seconds = sum((r.stopped if r.stopped is not None else end) - r.created for r in self.replicas)
        busy = sum(r.busy_time for r in self.replicas)
        served = sum(r.context + r.output for r in self.requests if r.finish is not None and r.status == 200)
        capacity = self.auto.predictive.capacity_tokens_per_s
        ttfts.sort()
        decisions = getattr(self.policy, "decisions", [])
        metrics = {
            "policy": self.policy_name,
            "requests": len(self.requests),
            "duration_s": round(end, 3),
            "replica_seconds": round(replica_seconds, 3),
            "idle_replica_seconds": round(replica_seconds - busy, 3),
            "utilization": round(busy / replica_seconds, 4) if replica_seconds else 0.0,
            # the share of the fleet's capacity at the SLO (config's capacity_tokens_per_s) the served load used
            "capacity_utilization": round(served / (capacity * replica_seconds), 4) if replica_seconds else 0.0,
            "tokens_served": served,
            "slo_attainment": round(met / len(self.requests), 5) if self.requests else 1.0,
            "slo_misses": len(self.requests) - met,
            "ttft_slo_s": slo,
            "ttft_p50_s": _quantile(ttfts, 0.5),
            "ttft_p99_s": _quantile(ttfts, 0.99),
            "rejected": sum(rec["status"] != 200 for rec in records),
            "scale_events": self.scale_events,
            "peak_replicas": max((int(v) for v in self.timeline["target"]), default=self.target),
            "mean_replicas": round(replica_seconds / end, 3) if end else 0.0,
        }
        if self.policy_name == "predictive":
            metrics["fallback_ticks"] = getattr(self.policy, "fallback_ticks", 0)
            metrics["forecast_fallback"] = metrics["fallback_ticks"] > 0
            metrics["predicted_ramps"] = sum(d.predicted_ramp for d in decisions)
        return SimulationResult(self.policy_name, metrics, records, self.timeline, decisions)


def _quantile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return round(ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))], 4)
