"""The rollout controller: one canary's state machine, pure (no Ray, no I/O, time from an injected clock).

    start ─▶ shadow (optional: a share of stable traffic mirrored, answers discarded)
          ─▶ step 1 … step N (candidate share per step; each held ``hold_s`` with ``min_requests``)
          ─▶ "promote" (asked of the owner, who moves the registry alias) ─▶ promoted | promotion_refused

Any breach of the thresholds (error rate, empty/degenerate outputs, latency, time to first token,
relative to the stable version over the same window) ends it as ``rolled_back`` on the spot; an
abort ends it as ``aborted``. The owner (the router deployment) routes by :attr:`share`, feeds
every finished request to :meth:`observe`, calls :meth:`tick` periodically, and is told of share
changes and endings through two callbacks.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from typing import Any

from llmstack.config import to_dict
from llmstack.serve.routing.canary_config import CanaryPlan, CanaryThresholds
from llmstack.serve.routing.kpis import KPIWindow, Observation, percentile

RUNNING = "running"
PROMOTE = "promote"  # what tick() returns when the plan is done and the alias should move


class RolloutController:
    """The state of one canary of ``candidate`` against ``stable``.

    Args:
        kpis: the live KPI window of each version (the candidate's and the stable one's at least).
        clock: monotonic seconds; wall: epoch seconds (both injected for tests).
        on_share: called with the candidate's new share (percent) whenever it changes.
        on_end: called with ``(state, reason)`` once, when the canary ends.
    """

    def __init__(self, *, candidate: str, stable: str, plan: CanaryPlan, thresholds: CanaryThresholds,
                 force: bool, kpis: Mapping[str, KPIWindow], clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time, on_share: Callable[[float], None] = lambda share: None,
                 on_end: Callable[[str, str], None] = lambda state, reason: None,
                 rng: random.Random | None = None) -> None:
        self.candidate, self.stable = candidate, stable
        self.plan, self.thresholds, self.force = plan, thresholds, force
        self.kpis = kpis
        self.clock, self.wall = clock, wall
        self.on_share, self.on_end = on_share, on_end
        self.rng = rng or random.Random()
        now = clock()
        self.started_at, self.started_wall = now, wall()
        self.step = -1  # -1: shadow phase; 0..: index into plan.steps
        self.step_started_at = now
        self.step_requests = 0
        self.state = RUNNING
        self.first_bad_at: float | None = None  # first candidate observation that was bad (error, bad output, slow)
        self.breach_at: float | None = None
        self.zero_at: float | None = None  # when the candidate's share became 0 (rollback/abort)
        self.reason: str | None = None
        self.breach: dict[str, Any] | None = None
        self.shadow_compared = 0
        self.shadow_agreed = 0
        self.routed_to_candidate = 0
        self.ended_wall: float | None = None
        if plan.shadow_hold_s <= 0:
            self._enter_step(0)

    # ------------------------------------------------------------------ what the owner asks

    @property
    def running(self) -> bool:
        return self.state == RUNNING

    @property
    def share(self) -> float:
        """The candidate's share of live traffic now (percent)."""
        if not self.running or self.step < 0:
            return 0.0
        return float(self.plan.steps[self.step])

    def routed(self, version: str) -> None:
        """A live request was routed to ``version`` (ingress replicas may report it after the canary ended:
        it still counts as routed to the candidate, not as evidence for a step)."""
        if version == self.candidate:
            self.routed_to_candidate += 1
            if self.running:
                self.step_requests += 1

    def wants_shadow(self, routed: str) -> bool:
        """Mirror this request (routed to ``routed``) to the candidate? Only stable traffic, in the shadow phase."""
        return (self.running and self.step == -1 and routed == self.stable and self.plan.shadow_share > 0
                and self.rng.random() < self.plan.shadow_share)

    def shadow_compared_with(self, agreed: bool) -> None:
        self.shadow_compared += 1
        self.shadow_agreed += int(agreed)

    def observe(self, version: str, obs: Observation) -> None:
        """A request on ``version`` finished; a breach ends the canary right here, before the next is routed."""
        if not self.running or version != self.candidate:
            return
        if self.first_bad_at is None:
            if obs.error or obs.bad:
                self.first_bad_at = obs.t
            else:
                limit = self.latency_limit()
                if obs.latency > limit:
                    self.first_bad_at = obs.t - obs.latency + limit
        self.evaluate()

    def tick(self) -> str | None:
        """Periodic step: catch breaches by requests stuck in flight, then advance the plan when due.

        Returns ``PROMOTE`` when the last step ended clean and the plan promotes automatically.
        """
        if not self.running:
            return None
        self.evaluate()
        if not self.running:
            return None
        now = self.clock()
        hold = self.plan.shadow_hold_s if self.step == -1 else self.plan.hold_s
        if now - self.step_started_at < hold:
            return None
        if self.step >= 0 and self.step_requests < self.plan.min_requests:
            return None  # not enough evidence at this share yet
        if (self.step == -1 and self.shadow_compared == 0 and self.plan.min_requests > 0
                and self.kpis[self.candidate].totals["shadow_requests"] == 0):
            return None
        if self.step + 1 < len(self.plan.steps):
            self._enter_step(self.step + 1)
            return None
        if not self.plan.steps:
            self.end("shadow_done", "shadow phase clean")
            return None
        if self.plan.steps[-1] < 100 or not self.plan.auto_promote:
            return None  # holds at the last step until promoted or aborted by hand
        return PROMOTE

    def end(self, state: str, reason: str) -> None:
        """Finish: for anything but a promotion the candidate's share drops to 0 at once."""
        if not self.running and state != "promoted":
            return
        if state != "promoted":
            self.zero_at = self.clock()
        self.state = state
        self.reason = reason
        self.ended_wall = self.wall()
        self.on_end(state, reason)

    # ------------------------------------------------------------------ the checks

    def latency_limit(self, *, ttft: bool = False) -> float:
        """Latency (or TTFT) past which a candidate request is slow: stable p95 x ratio, at least p95 + floor."""
        th = self.thresholds
        now = self.clock()
        stable = self.kpis[self.stable].window(self.started_at - th.window_s, now, th.window_s)
        samples = [o.ttft if ttft else o.latency for o in stable if not o.error and not o.shadow]
        samples = [s for s in samples if s is not None]
        if len(samples) < th.min_stable_samples:
            return th.latency_floor_s * 4
        p95 = percentile(samples, 0.95) or 0.0
        ratio = th.max_ttft_ratio if ttft else th.max_latency_ratio
        return max(p95 * ratio, p95 + th.latency_floor_s)

    def evaluate(self) -> None:
        """Compare the candidate's window with the stable one's; a breach rolls the candidate back."""
        th = self.thresholds
        now = self.clock()
        candidate_kpis = self.kpis[self.candidate]
        cand = candidate_kpis.window(self.started_at, now, th.window_s)
        stable = [o for o in self.kpis[self.stable].window(self.started_at, now, th.window_s) if not o.shadow]
        cs, ss = KPIWindow.summarize(cand), KPIWindow.summarize(stable)
        reason = None
        if cs["errors"] >= th.min_errors and cs["error_rate"] - ss["error_rate"] > th.max_error_rate_delta:
            reason = (f"error rate {cs['error_rate']:.2f} ({cs['errors']}/{cs['requests']}) vs stable "
                      f"{ss['error_rate']:.2f}")
        elif (cs["bad_outputs"] >= th.min_bad_outputs
              and cs["bad_output_rate"] - ss["bad_output_rate"] > th.max_bad_output_delta):
            reason = (f"empty/degenerate outputs {cs['bad_output_rate']:.2f} ({cs['bad_outputs']}/{cs['requests']}) "
                      f"vs stable {ss['bad_output_rate']:.2f}")
        else:
            limit = self.latency_limit()
            ages = [now - t0 for t0 in candidate_kpis.in_flight.values()]
            lat = [o.latency for o in cand if not o.error] + ages
            slow = [x for x in lat if x > limit]
            if len(slow) >= th.min_slow and (percentile(lat, 0.95) or 0.0) > limit:
                if self.first_bad_at is None:
                    self.first_bad_at = now - max(slow) + limit
                reason = (f"latency: {len(slow)} of {len(lat)} requests over {limit:.2f} s "
                          f"(stable p95 {ss['p95_s'] or 0:.3f} s x{th.max_latency_ratio})")
            else:
                tlimit = self.latency_limit(ttft=True)
                ttfts = [o.ttft for o in cand if o.ttft is not None]
                tslow = [x for x in ttfts if x > tlimit]
                if len(tslow) >= th.min_slow and (percentile(ttfts, 0.95) or 0.0) > tlimit:
                    if self.first_bad_at is None:
                        self.first_bad_at = now - max(tslow) + tlimit
                    reason = f"time to first token: {len(tslow)} of {len(ttfts)} over {tlimit:.2f} s"
        if reason is not None:
            self.breach_at = now
            self.breach = {"candidate": cs, "stable": ss}
            self.end("rolled_back", f"breach: {reason}")

    def _enter_step(self, step: int) -> None:
        self.step = step
        self.step_started_at = self.clock()
        self.step_requests = 0
        self.on_share(self.share)

    # ------------------------------------------------------------------ status

    def status(self, *, candidate_ref: str | None = None) -> dict[str, Any]:
        now = self.clock()
        th = self.thresholds
        cand = self.kpis[self.candidate].window(self.started_at, now, th.window_s)
        stable = [o for o in self.kpis[self.stable].window(self.started_at, now, th.window_s) if not o.shadow]
        phase = "shadow" if self.step == -1 else f"step {self.step + 1}/{len(self.plan.steps)}"
        return {
            "candidate": self.candidate, "candidate_ref": candidate_ref, "stable": self.stable,
            "state": self.state, "phase": phase, "share": self.share,
            "step_requests": self.step_requests, "routed_to_candidate": self.routed_to_candidate,
            "reason": self.reason, "plan": to_dict(self.plan), "thresholds": to_dict(th), "forced": self.force,
            "started_at": self.started_wall, "ended_at": self.ended_wall,
            "first_bad_to_zero_s": (self.zero_at - self.first_bad_at) if self.zero_at and self.first_bad_at else None,
            "breach_to_zero_s": (self.zero_at - self.breach_at) if self.zero_at and self.breach_at else None,
            "kpis": {"candidate": KPIWindow.summarize(cand), "stable": KPIWindow.summarize(stable)},
            "shadow": {"compared": self.shadow_compared, "agreed": self.shadow_agreed},
        }
