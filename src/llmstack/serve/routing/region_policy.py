"""The global router's brain, pure and on an injected clock: region choice per policy, health, ejection.

:class:`RegionRouter` holds each region's recent latencies, requests in flight and health, and answers
one question per request: which region next. It does no I/O, so every rule is unit-tested with a fake clock.

Policies (``routing.policy``), over the healthy regions with spare capacity:

* ``cost``: the cheapest region whose recent p95 meets ``slo_p95_s``; a region with too few samples is
  explored first (cheapest first), so a new or re-admitted region gets measured. If no region meets the
  SLO, the region with the lowest p95 serves anyway and the choice is flagged ``slo_met=False``.
* ``latency``: the lowest recent p95 (unmeasured regions explored first).
* ``round_robin``: each region in turn.
* manual ``weights`` (config or :meth:`set_weights`) override the policy: a weighted draw.

Health: a failed request or probe counts against a region; ``eject_after_failures`` in a row eject it (a
hard failure, the backend gone, ejects at once). A region with even one failure since its last success is
*suspect*: it gets no new request while another healthy region without failures has room (routed around at
once, ejected only after the confirmation), so a dying region stops getting traffic at its first sign; so is
one whose probe has gone unanswered for half the probe timeout (:meth:`probe_slow`, no failure yet). An
ejected region gets no traffic unless every region is ejected; ``readmit_after_probes`` passing probes in a
row re-admit it. Another router replica's ejection (shared through the board) ejects here too (:meth:`eject`).
"""

from __future__ import annotations

import itertools
import random
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from llmstack.errors import RequestError


@dataclass
class Choice:
    region: str
    slo_met: bool  # False: no eligible region meets the SLO (served by the best one anyway)
    reason: str  # policy | explore | weights | fallback (every region ejected or full)


@dataclass
class RegionState:
    name: str
    price: float  # $ per replica-hour
    latency_s: float  # added network round trip
    capacity: int  # requests in flight before the region counts as full
    healthy: bool = True
    failures: int = 0  # consecutive failures (requests or probes)
    passes: int = 0  # consecutive passing probes while ejected
    in_flight: int = 0
    samples: deque = field(default_factory=deque)  # (time, latency seconds) of finished requests
    ejected_at: float | None = None
    readmitted_at: float | None = None
    last_routed_at: float | None = None
    seen_up: bool = False  # a probe passed or a request succeeded at least once
    slow: bool = False  # a probe has gone unanswered for half its timeout (suspect; not yet a failure)
    totals: dict[str, int] = field(default_factory=lambda: {"routed": 0, "ok": 0, "failed": 0, "moved": 0,
                                                                 "ejections": 0})


def nearest_rank(values: Iterable[float], q: float) -> float | None:
    ordered = sorted(values)
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


class RegionRouter:
    """Region choice and health for the global router (pure: no I/O; time from ``clock``).

    Args:
        regions: name -> mapping with ``price_per_replica_hour``, ``latency_ms`` and ``capacity``.
        routing: a :class:`~llmstack.serve.routing.regions_config.RoutingConfig` as a dict (or the object).
        clock: seconds, monotonic (tests pass a fake).
        rng: the random source of weighted draws.

    Example:
        >>> r = RegionRouter({"a": {"price_per_replica_hour": 2, "capacity": 4},
        ...                   "b": {"price_per_replica_hour": 1, "capacity": 4}}, {"policy": "cost"})
        >>> r.choose().region
        'b'
    """

    def __init__(self, regions: Mapping[str, Mapping[str, Any]], routing: Any, *,
                 clock: Callable[[], float] | None = None, rng: random.Random | None = None) -> None:
        import time

        from llmstack.config import load_config
        from llmstack.serve.routing.regions_config import RoutingConfig

        self.cfg = routing if isinstance(routing, RoutingConfig) else load_config(RoutingConfig, dict(routing))
        self.clock = clock or time.monotonic
        self.rng = rng or random.Random()
        self.regions: dict[str, RegionState] = {
            name: RegionState(name=name, price=float(r["price_per_replica_hour"]),
                              latency_s=float(r.get("latency_ms", 0.0)) / 1000.0,
                              capacity=max(1, int(r.get("capacity", 1))))
            for name, r in regions.items()}
        self.weights: dict[str, float] = dict(self.cfg.weights)
        self.events: deque[dict[str, Any]] = deque(maxlen=200)
        self._turn = itertools.count()

    # ------------------------------------------------------------------ choice

    def p95(self, name: str) -> float | None:
        """The region's p95 latency over the window (None: fewer than ``min_samples`` samples)."""
        state = self.regions[name]
        self._forget(state)
        if len(state.samples) < self.cfg.min_samples:
            return None
        return nearest_rank((s for _, s in state.samples), 95)

    def _forget(self, state: RegionState) -> None:
        horizon = self.clock() - self.cfg.window_s
        while state.samples and state.samples[0][0] < horizon:
            state.samples.popleft()

    def _unmeasured(self, state: RegionState) -> bool:
        """Too few samples, counting requests in flight as samples on their way (no explore stampede)."""
        self._forget(state)
        return len(state.samples) + state.in_flight < self.cfg.min_samples

    def eligible(self, exclude: Iterable[str] = ()) -> tuple[list[RegionState], str]:
        """The regions a request may go to, and why: healthy with room and no failure since the last success
        (else healthy with room, suspects included), else healthy, else any not excluded."""
        out = set(exclude)
        pool = [s for s in self.regions.values() if s.name not in out]
        healthy = [s for s in pool if s.healthy]
        roomy = [s for s in healthy if s.in_flight < s.capacity]
        trusted = [s for s in roomy if not s.failures and not s.slow]
        if trusted:  # a suspect (one failure) is routed around while a trusted region has room
            return trusted, "policy"
        if roomy:
            return roomy, "policy"
        if healthy:  # every healthy region is full: the least loaded one queues it
            least = min(s.in_flight / s.capacity for s in healthy)
            return [s for s in healthy if s.in_flight / s.capacity == least], "fallback"
        return pool, "fallback"  # every region ejected: try anyway rather than fail outright

    def choose(self, exclude: Iterable[str] = ()) -> Choice:
        """The region for the next request (not one of ``exclude``).

        Raises:
            RequestError: 503 when no region is left to try.
        """
        pool, why = self.eligible(exclude)
        if not pool:
            raise RequestError("no region is left to serve this request", status_code=503,
                               type="service_unavailable", code="no_region", headers={"Retry-After": "1"})
        weighted = [s for s in pool if self.weights.get(s.name, 0.0) > 0]
        if self.weights and weighted:
            total = sum(self.weights[s.name] for s in weighted)
            point = self.rng.random() * total
            for s in weighted:
                point -= self.weights[s.name]
                if point < 0:
                    break
            return Choice(s.name, self._meets(s), "weights" if why == "policy" else why)
        policy = self.cfg.policy
        if policy == "round_robin":
            state = pool[next(self._turn) % len(pool)]
            return Choice(state.name, self._meets(state), why)
        unmeasured = [s for s in pool if self._unmeasured(s)]
        if unmeasured:
            key = (lambda s: (s.price, s.latency_s)) if policy == "cost" else (lambda s: (s.latency_s, s.price))
            return Choice(min(unmeasured, key=key).name, True, "explore" if why == "policy" else why)
        p95 = {s.name: self.p95(s.name) for s in pool}
        if policy == "cost":
            meeting = [s for s in pool if (p95[s.name] or 0.0) <= self.cfg.slo_p95_s]
            if meeting:
                return Choice(min(meeting, key=lambda s: (s.price, p95[s.name] or 0.0)).name, True, why)
        best = min(pool, key=lambda s: (p95[s.name] or 0.0, s.price))
        return Choice(best.name, (p95[best.name] or 0.0) <= self.cfg.slo_p95_s, why)

    def _meets(self, state: RegionState) -> bool:
        p95 = self.p95(state.name)
        return p95 is None or p95 <= self.cfg.slo_p95_s

    def slo_unmet(self) -> bool:
        """True when no healthy region with enough samples meets the SLO (and at least one is measured)."""
        measured = [p for p in (self.p95(s.name) for s in self.regions.values() if s.healthy) if p is not None]
        return bool(measured) and min(measured) > self.cfg.slo_p95_s

    # ------------------------------------------------------------------ passive signals

    def begin(self, name: str) -> None:
        state = self.regions[name]
        state.in_flight += 1
        state.totals["routed"] += 1
        state.last_routed_at = self.clock()

    def succeeded(self, name: str, latency_s: float) -> None:
        """A request finished well in ``latency_s`` (router-measured, network offset included)."""
        state = self.regions[name]
        state.in_flight = max(0, state.in_flight - 1)
        state.samples.append((self.clock(), latency_s))
        state.totals["ok"] += 1
        state.seen_up = True
        state.slow = False
        if state.healthy:
            state.failures = 0

    def failed(self, name: str, *, hard: bool = False, reason: str = "error") -> None:
        """A request failed on the region's side (5xx, timeout); ``hard``: the backend is gone (ejects now)."""
        state = self.regions[name]
        state.in_flight = max(0, state.in_flight - 1)
        state.totals["failed"] += 1
        self._failure(state, hard=hard, reason=reason)

    def released(self, name: str, *, moved: bool = False) -> None:
        """A request ended without evidence either way (the client left, a 4xx: the caller's mistake, or
        ``moved``: it was waiting on the region when the region was ejected, and goes elsewhere)."""
        state = self.regions[name]
        state.in_flight = max(0, state.in_flight - 1)
        if moved:
            state.totals["moved"] += 1

    def _failure(self, state: RegionState, *, hard: bool, reason: str) -> None:
        if not state.healthy:
            state.passes = 0
            return
        state.failures += 1
        if hard or state.failures >= self.cfg.eject_after_failures:
            self._eject(state, reason)
        elif state.failures == 1 and not state.slow:  # a slow probe said so already
            self._event("suspect", state.name, reason=reason)

    def _eject(self, state: RegionState, reason: str) -> None:
        state.healthy = False
        state.passes = 0
        state.ejected_at = self.clock()
        state.totals["ejections"] += 1
        self._event("ejected", state.name, reason=reason, failures=state.failures)

    def eject(self, name: str, *, reason: str) -> bool:
        """Eject a region on outside evidence (another router replica ejected it); False if already ejected."""
        state = self.regions[name]
        if not state.healthy:
            return False
        self._eject(state, reason)
        return True

    # ------------------------------------------------------------------ active probes

    def probed(self, name: str, ok: bool, *, reason: str = "probe") -> None:
        """One active probe's result: failures count toward ejection; passes toward re-admission.

        Probes fail while a region's replicas are still starting: until its first passing probe or
        answered request, a region's failed probes are not held against it (its failed requests are).
        """
        state = self.regions[name]
        if not ok:
            if state.seen_up:
                self._failure(state, hard=False, reason=reason)
            return
        state.seen_up = True
        state.slow = False
        if state.healthy:
            state.failures = 0
            return
        state.passes += 1
        if state.passes >= self.cfg.readmit_after_probes:
            state.healthy = True
            state.failures = 0
            state.passes = 0
            state.readmitted_at = self.clock()
            state.samples.clear()  # measured afresh: its old latencies belong to before the outage
            self._event("readmitted", name)

    def probe_slow(self, name: str) -> None:
        """A probe has gone unanswered for half its timeout: the region is suspect (routed around while a
        trusted region has room) until a probe passes or a request succeeds; it is no failure yet."""
        state = self.regions[name]
        if state.healthy and state.seen_up and not state.slow:
            state.slow = True
            if not state.failures:
                self._event("suspect", name, reason="slow probe")

    # ------------------------------------------------------------------ admin

    def set_weights(self, weights: Mapping[str, float] | None) -> dict[str, float]:
        """Replace the manual override (empty or None: back to the policy).

        Raises:
            ConfigError: unknown regions, negative weights, or all zero.
        """
        from llmstack.errors import ConfigError

        weights = {str(k): float(v) for k, v in (weights or {}).items()}
        problems = [f"weights.{k}: unknown region (known: {', '.join(self.regions)})"
                    for k in weights if k not in self.regions]
        problems += [f"weights.{k}: must be >= 0, got {v:g}" for k, v in weights.items() if v < 0]
        if weights and not sum(weights.values()) > 0:
            problems.append("weights: at least one region needs a weight > 0")
        if problems:
            raise ConfigError(problems)
        self.weights = weights
        self._event("weights", None, weights=dict(weights))
        return dict(weights)

    def set_routing(self, *, policy: str | None = None, slo_p95_s: float | None = None) -> None:
        """Change the policy or the SLO at run time (the next request uses them).

        Raises:
            ConfigError: an unknown policy or an SLO <= 0.
        """
        import dataclasses

        from llmstack.errors import ConfigError
        from llmstack.serve.routing.regions_config import POLICIES

        problems = []
        if policy is not None and policy not in POLICIES:
            problems.append(f"policy: must be one of {', '.join(POLICIES)}, got {policy!r}")
        if slo_p95_s is not None and not (isinstance(slo_p95_s, (int, float)) and slo_p95_s > 0):
            problems.append(f"slo_p95_s: must be > 0, got {slo_p95_s!r}")
        if problems:
            raise ConfigError(problems)
        changes = {k: v for k, v in (("policy", policy), ("slo_p95_s", slo_p95_s)) if v is not None}
        if changes:
            self.cfg = dataclasses.replace(self.cfg, **changes)
            self._event("routing", None, **changes)

    def _event(self, kind: str, region: str | None, **data: Any) -> None:
        self.events.append({"t": self.clock(), "event": kind, **({"region": region} if region else {}), **data})

    def status(self) -> dict[str, Any]:
        regions = {}
        for name, s in self.regions.items():
            p95 = self.p95(name)
            regions[name] = {"healthy": s.healthy, "suspect": s.healthy and (s.failures > 0 or s.slow),
                             "price_per_replica_hour": s.price,
                             "latency_ms": s.latency_s * 1000, "in_flight": s.in_flight, "capacity": s.capacity,
                             "p95_s": p95, "samples": len(s.samples),
                             "slo_met": None if p95 is None else p95 <= self.cfg.slo_p95_s,
                             "consecutive_failures": s.failures, "ejected_at": s.ejected_at,
                             "readmitted_at": s.readmitted_at, "totals": dict(s.totals)}
        return {"policy": self.cfg.policy, "slo_p95_s": self.cfg.slo_p95_s, "weights": dict(self.weights),
                "slo_unmet": self.slo_unmet(), "regions": regions, "events": list(self.events)[-30:]}
