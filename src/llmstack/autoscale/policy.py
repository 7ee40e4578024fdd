"""The predictive, SLO-aware autoscaling policy Ray Serve calls, and the dict that plugs it into Serve.

Serve's custom-policy API takes a class as ``autoscaling_config.policy.policy_function``: the controller
builds it once with ``policy_kwargs`` and calls ``instance(ctx) -> (replicas, state)`` every control tick,
then applies ``min/max_replicas`` and its up/down-scale delays. :class:`PredictivePolicy` keeps its own
cool-downs and hysteresis, so :func:`serve_autoscaling_config` sets Serve's delays to 0 for it.

Each tick the policy:

1. reads cumulative counters (requests arrived, prompt+output tokens) and differences them every
   ``forecast_bin_s`` into a request-rate and a token-rate series;
2. forecasts both with Holt-Winters (damped trend; seasonal once two ``season_s`` periods exist) over
   ``forecast_horizon_s`` and converts the peak into replicas through the measured per-replica capacity
   (``capacity_tokens_per_s`` at the TTFT SLO) plus ``headroom`` (smoothing: ``forecast_alpha``,
   ``forecast_beta``, ``forecast_phi``);
3. keeps at least the reserve (the ``reserve_quantile`` of the per-bin demand over the last
   ``reserve_window_s``; off by default): for traffic whose bursts start from idle faster than a replica
   starts, which no forecast of the rate sees coming;
4. adds the backlog (``backlog_source: ongoing``: ongoing requests beyond ``target_ongoing_requests`` per
   replica; ``queued``: only the requests waiting at handles, the ones a new replica can take);
5. scales up at once (after ``upscale_cooldown_s``), ahead of a predicted ramp; scales down only after the
   lower demand held for ``downscale_stable_s``, sat below ``(replicas - 1) * (1 - hysteresis)``, and
   ``downscale_cooldown_s`` passed since the last scale event.

Before two bins of history exist (or without counters) it uses Serve's queue-depth rule and says so in its
state (``mode: reactive-fallback``) and in the simulator's metrics.

Counters come from ``ctx.load_counters`` when the caller provides them (the simulator does), else from the
app's Prometheus ``/metrics`` (``metrics_url``), scraped on a background thread.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
import urllib.request
from collections import deque
from typing import Any

from llmstack.autoscale.forecast import HoltWinters
from llmstack.config import ReplicaAutoscalingConfig, load_config, to_dict

logger = logging.getLogger("ray.serve.llmstack_autoscale")  # shows in Serve's controller log

POLICY_IMPORT_PATH = "llmstack.autoscale.policy:PredictivePolicy"
MODE_PREDICTIVE = "predictive"
MODE_FALLBACK = "reactive-fallback"
MAX_DECISIONS_KEPT = 50_000


@dataclasses.dataclass(frozen=True)
class LoadCounters:
    """Cumulative load counters at ``time``: requests arrived, and the prompt+output tokens counted so far."""

    time: float
    requests: float
    tokens: float
    completed: float | None = None  # requests whose tokens are in ``tokens`` (None: all of them)


@dataclasses.dataclass
class Decision:
    """What the policy decided on one tick, and why (kept for metrics and transition analysis)."""

    time: float
    replicas: int
    mode: str
    forecast_replicas: float  # peak forecast demand over the horizon, in replicas (with headroom)
    current_replicas: float  # demand of the last bin, in replicas (with headroom)
    backlog_replicas: float
    predicted_ramp: bool  # scaled up because of the forecast, before the current load asked for it


def serve_autoscaling_config(auto: ReplicaAutoscalingConfig) -> dict[str, Any]:
    """The ``autoscaling_config`` dict for ``LLMServer.options(...)``.

    ``policy: reactive`` keeps Serve's default queue-depth policy; ``policy: predictive`` plugs in
    :class:`PredictivePolicy` with the config as its kwargs (Serve's own delays set to 0: the policy
    applies its cool-downs and hysteresis itself).

    Example:
        >>> from llmstack.config import ReplicaAutoscalingConfig
        >>> d = serve_autoscaling_config(ReplicaAutoscalingConfig(max_replicas=3, policy="predictive"))
        >>> d["policy"]["policy_function"], d["upscale_delay_s"]
        ('llmstack.autoscale.policy:PredictivePolicy', 0.0)
    """
    config = {
        "min_replicas": auto.min_replicas,
        "initial_replicas": max(auto.min_replicas, 1),
        "max_replicas": auto.max_replicas,
        "target_ongoing_requests": auto.target_ongoing_requests,
        "upscale_delay_s": auto.upscale_delay_s,
        "downscale_delay_s": auto.downscale_delay_s,
        "look_back_period_s": auto.look_back_period_s,
        "metrics_interval_s": auto.metrics_interval_s,
    }
    if auto.policy == "predictive":
        config.update(upscale_delay_s=0.0, downscale_delay_s=0.0,
                      policy={"policy_function": POLICY_IMPORT_PATH, "policy_kwargs": to_dict(auto)})
    return config


class PredictivePolicy:
    """Ray Serve class-callable policy: forecast load, provision ahead, scale down with hysteresis.

    Args:
        **config: :class:`~llmstack.config.ReplicaAutoscalingConfig` fields (Serve passes ``policy_kwargs``).

    Example:
        >>> policy = PredictivePolicy(max_replicas=4, policy="predictive")
        >>> policy.config.predictive.forecast_horizon_s
        10.0
    """

    def __init__(self, **config: Any) -> None:
        self.config: ReplicaAutoscalingConfig = load_config(ReplicaAutoscalingConfig, config)
        c = self.config
        forecast = c.predictive
        season = round(forecast.season_s / forecast.forecast_bin_s) if forecast.season_s else 0
        smoothing = {"alpha": forecast.forecast_alpha, "beta": forecast.forecast_beta, "phi": forecast.forecast_phi,
                     "season": season}
        self.request_rate = HoltWinters(**smoothing)
        self.token_rate = HoltWinters(**smoothing)
        self._history: deque[tuple[float, float]] = deque()  # (time, bin demand) over reserve_window_s
        self.decisions: deque[Decision] = deque(maxlen=MAX_DECISIONS_KEPT)  # the ticks that changed the target
        self.fallback_ticks = 0
        self.log_decisions = True  # one log line per change of target (the simulator turns it off)
        self._last_counters: LoadCounters | None = None
        self._last_bin_demand = 0.0
        self._low_since: float | None = None
        self._low_peak = 0.0  # highest demand seen while waiting to scale down
        self._last_scale_time = -math.inf
        self._last_up_time = -math.inf
        self._last_target: int | None = None
        url = forecast.metrics_url
        self._scraper = _MetricsScraper(url, c.metrics_interval_s) if url else None

    # ------------------------------------------------------------------ Serve entry point

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        now = float(ctx.current_time if ctx.current_time is not None else time.time())
        target = int(ctx.target_num_replicas)
        if self._last_target is not None and target != self._last_target:
            self._last_scale_time = now  # Serve (or bounds) moved the target
        self._observe(self._counters(ctx), now)
        decision = self._decide(ctx, now, target)
        if decision.replicas != target:
            self.decisions.append(decision)
            if self.log_decisions:
                logger.info("autoscale %s: %d -> %d replicas (mode %s, forecast %.2f, now %.2f, backlog %.2f)",
                            getattr(ctx, "deployment_name", "?"), target, decision.replicas, decision.mode,
                            decision.forecast_replicas, decision.current_replicas, decision.backlog_replicas)
            self._last_scale_time = now
            if decision.replicas > target:
                self._last_up_time = now
        self._last_target = decision.replicas
        state = {"mode": decision.mode, "forecast_replicas": round(decision.forecast_replicas, 3),
                 "backlog_replicas": round(decision.backlog_replicas, 3), "fallback_ticks": self.fallback_ticks,
                 "reserve_replicas": round(self._reserve(), 3)}
        return decision.replicas, state

    # ------------------------------------------------------------------ internals

    def _counters(self, ctx: Any) -> LoadCounters | None:
        counters = getattr(ctx, "load_counters", None)
        if counters is None and self._scraper is not None:
            counters = self._scraper.latest()
        return counters

    def _observe(self, counters: LoadCounters | None, now: float) -> None:
        if counters is None:
            return
        last = self._last_counters
        if last is None:
            self._last_counters = counters
            return
        elapsed = counters.time - last.time
        if elapsed + 1e-9 < self.config.predictive.forecast_bin_s:
            return
        requests_per_s = max(0.0, counters.requests - last.requests) / elapsed
        # Servers count tokens when a request completes: while requests queue, arrivals times the tokens
        # per request seen so far is the earlier signal.
        # (also smoother than differencing tokens counted in bunches as requests finish together).
        done = counters.requests if counters.completed is None else counters.completed
        per_request = counters.tokens / done if done > 0 else 0.0
        tokens_per_s = requests_per_s * per_request
        self.request_rate.update(requests_per_s)
        self.token_rate.update(tokens_per_s)
        self._last_bin_demand = self._demand(requests_per_s, tokens_per_s)
        self._last_counters = counters
        if self.config.predictive.reserve_window_s > 0:
            self._history.append((counters.time, self._last_bin_demand))
            while self._history and self._history[0][0] <= counters.time - self.config.predictive.reserve_window_s:
                self._history.popleft()

    def _reserve(self) -> float:
        """The ``reserve_quantile`` of the per-bin demand over the last ``reserve_window_s`` (0 when off)."""
        if not self._history:
            return 0.0
        ordered = sorted(d for _, d in self._history)
        return ordered[min(len(ordered) - 1, int(self.config.predictive.reserve_quantile * len(ordered)))]

    def _demand(self, requests_per_s: float, tokens_per_s: float) -> float:
        """Replicas needed for a load, with headroom."""
        c = self.config
        replicas = tokens_per_s / c.predictive.capacity_tokens_per_s
        if c.predictive.capacity_requests_per_s:
            replicas = max(replicas, requests_per_s / c.predictive.capacity_requests_per_s)
        return replicas * (1 + c.predictive.headroom)

    def _decide(self, ctx: Any, now: float, target: int) -> Decision:
        c = self.config
        ongoing = float(ctx.total_num_requests or 0.0)
        running = int(ctx.current_num_replicas)
        low, high = int(ctx.capacity_adjusted_min_replicas), int(ctx.capacity_adjusted_max_replicas)
        if not (self.request_rate.ready and self.token_rate.ready):
            self.fallback_ticks += 1
            queue_rule = ongoing / c.target_ongoing_requests if running else float(target)
            replicas = _clamp(math.ceil(queue_rule - 1e-9), low, high)
            return Decision(now, replicas, MODE_FALLBACK, 0.0, 0.0, 0.0, False)
        steps = max(1, round(c.predictive.forecast_horizon_s / c.predictive.forecast_bin_s))
        forecast = max(self._demand(self.request_rate.forecast(h), self.token_rate.forecast(h))
                       for h in range(1, steps + 1))
        current = self._last_bin_demand
        if c.predictive.backlog_source == "queued":
            backlog = float(getattr(ctx, "total_queued_requests", 0.0) or 0.0) / c.target_ongoing_requests
        else:
            backlog = max(0.0, ongoing - running * c.target_ongoing_requests) / c.target_ongoing_requests
        reserve = self._reserve()
        wanted = max(forecast, current, reserve) + backlog
        desired = _clamp(math.ceil(wanted - 1e-9), low, high)
        replicas = target
        ramp = False
        if desired > target:
            self._low_since = None
            if now - self._last_up_time >= c.predictive.upscale_cooldown_s:
                replicas = desired
                ramp = math.ceil(max(current, reserve) + backlog - 1e-9) <= target < desired
        elif desired < target and wanted <= (target - 1) * (1 - c.predictive.hysteresis):
            if self._low_since is None:
                self._low_since, self._low_peak = now, wanted
            self._low_peak = max(self._low_peak, wanted)
            if (now - self._low_since >= c.predictive.downscale_stable_s
                    and now - self._last_scale_time >= c.predictive.downscale_cooldown_s):
                replicas = max(desired, _clamp(math.ceil(self._low_peak - 1e-9), low, high))
                self._low_since = None
        else:
            self._low_since = None
        return Decision(now, replicas, MODE_PREDICTIVE, forecast, current, backlog, ramp)


def _clamp(value: int, low: int, high: int) -> int:
    return max(low, min(high, value))


class _MetricsScraper:
    """Polls the app's ``/metrics`` on a daemon thread; :meth:`latest` never blocks on the network.

    Arrivals are finished requests (the latency histogram's count, observed when a response or stream
    ends) plus those in flight; tokens are the prompt and completion token counters of finished requests.
    """

    def __init__(self, base_url: str, interval_s: float, timeout_s: float = 2.0) -> None:
        self.url = base_url.rstrip("/") + "/metrics"
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self._latest: LoadCounters | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._failures = 0
        threading.Thread(target=self._run, name="llmstack-autoscale-metrics", daemon=True).start()

    def latest(self) -> LoadCounters | None:
        with self._lock:
            return self._latest

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with urllib.request.urlopen(self.url, timeout=self.timeout_s) as response:
                    counters = parse_prometheus_counters(response.read().decode("utf-8"), time.time())
                with self._lock:
                    self._latest = counters
            except Exception as exc:  # unreachable app: the policy falls back to the queue rule
                self._failures += 1
                if self._failures in (1, 100):
                    logger.warning("autoscale: cannot read %s (%s); forecasting waits for counters", self.url, exc)
            self._stop.wait(self.interval_s)

    def __del__(self) -> None:
        self._stop.set()


def parse_prometheus_counters(text: str, now: float) -> LoadCounters:
    """Sum llmstack's finished-request, in-flight and token series from Prometheus text into :class:`LoadCounters`.

    Example:
        >>> parse_prometheus_counters('llmstack_request_latency_seconds_count{route="c"} 3.0\\nllmstack_requests_in_flight 2', 0.0)
        LoadCounters(time=0.0, requests=5.0, tokens=0.0, completed=3.0)
    """
    sums = {"llmstack_request_latency_seconds_count": 0.0, "llmstack_requests_in_flight": 0.0,
            "llmstack_prompt_tokens_total": 0.0, "llmstack_completion_tokens_total": 0.0}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in sums:
            try:
                sums[name] += float(line.rsplit(" ", 1)[1])
            except (IndexError, ValueError):
                continue
    finished = sums["llmstack_request_latency_seconds_count"]
    return LoadCounters(time=now, requests=finished + sums["llmstack_requests_in_flight"],
                        tokens=sums["llmstack_prompt_tokens_total"] + sums["llmstack_completion_tokens_total"],
                        completed=finished)
