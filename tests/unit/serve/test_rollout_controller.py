"""The canary rollout state machine on a fake clock, without Ray: breach, step, promote, abort, shadow."""

from __future__ import annotations

import random
from typing import Any

import pytest

from llmstack.serve.routing.canary_config import CanaryPlan, CanaryThresholds
from llmstack.serve.routing.controller import PROMOTE, RolloutController
from llmstack.serve.routing.kpis import KPIWindow, Observation

STABLE, CAND = "tiny-lm@v1", "tiny-lm@v2"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make(plan: dict[str, Any] | None = None, thresholds: dict[str, Any] | None = None, *,
         seed: int = 0) -> tuple[RolloutController, FakeClock, dict[str, KPIWindow], list[Any]]:
    clock = FakeClock()
    kpis = {STABLE: KPIWindow(clock), CAND: KPIWindow(clock)}
    events: list[Any] = []
    ctl = RolloutController(
        candidate=CAND, stable=STABLE, force=False, kpis=kpis, clock=clock, wall=clock,
        plan=CanaryPlan(**{"steps": [10, 50, 100], "hold_s": 30, "min_requests": 3, **(plan or {})}),
        thresholds=CanaryThresholds(**{"window_s": 60, **(thresholds or {})}),
        on_share=lambda share: events.append(("share", share)),
        on_end=lambda state, reason: events.append((state, reason)), rng=random.Random(seed))
    return ctl, clock, kpis, events


def finish(ctl: RolloutController, kpis: dict[str, KPIWindow], clock: FakeClock, version: str, *,
           latency: float = 0.1, error: bool = False, bad: bool = False, shadow: bool = False) -> None:
    """One request on ``version`` that took ``latency`` seconds (the clock moves by it)."""
    token = kpis[version].begin()
    clock.advance(latency)
    obs = Observation(clock(), latency, latency / 2, error, bad, shadow)
    kpis[version].end(token, obs)
    if not shadow:
        ctl.routed(version)
    ctl.observe(version, obs)


def test_steps_advance_only_after_hold_and_evidence_then_promote() -> None:
    ctl, clock, kpis, events = make()
    assert ctl.running and ctl.share == 10 and events == [("share", 10.0)]
    clock.advance(31)
    assert ctl.tick() is None and ctl.share == 10  # held long enough, but no candidate evidence yet
    for _ in range(3):
        finish(ctl, kpis, clock, STABLE)
        finish(ctl, kpis, clock, CAND)
    assert ctl.tick() is None and ctl.share == 50
    assert ctl.tick() is None and ctl.share == 50  # a new step starts its own hold
    clock.advance(31)
    for _ in range(3):
        finish(ctl, kpis, clock, CAND)
    ctl.tick()
    assert ctl.share == 100
    clock.advance(31)
    for _ in range(3):
        finish(ctl, kpis, clock, CAND)
    assert ctl.tick() == PROMOTE and ctl.running  # the owner moves the alias, then ends it as promoted
    ctl.end("promoted", "plan clean")
    assert ctl.state == "promoted" and ctl.zero_at is None and events[-1] == ("promoted", "plan clean")
    assert [e for e in events if e[0] == "share"] == [("share", 10.0), ("share", 50.0), ("share", 100.0)]


@pytest.mark.parametrize("kind", ["error", "bad"])
def test_error_or_degenerate_breach_rolls_back_on_the_observation(kind: str) -> None:
    ctl, clock, kpis, events = make(thresholds={"min_errors": 2, "min_bad_outputs": 2})
    for _ in range(5):
        finish(ctl, kpis, clock, STABLE)
    finish(ctl, kpis, clock, CAND, **{kind: True})
    assert ctl.running  # one bad answer is below the minimum count
    first_bad = ctl.first_bad_at
    finish(ctl, kpis, clock, CAND, **{kind: True})
    assert ctl.state == "rolled_back" and ctl.share == 0
    assert events[-1][0] == "rolled_back" and "breach" in events[-1][1]
    assert ctl.zero_at == clock() and first_bad is not None and ctl.zero_at - first_bad == pytest.approx(0.1)
    status = ctl.status()
    assert status["state"] == "rolled_back" and status["kpis"]["candidate"]["requests"] == 2


def test_stable_errors_at_the_same_rate_are_not_a_breach() -> None:
    ctl, clock, kpis, _ = make(thresholds={"min_errors": 2, "max_error_rate_delta": 0.05})
    for i in range(10):
        finish(ctl, kpis, clock, STABLE, error=i % 2 == 0)
        finish(ctl, kpis, clock, CAND, error=i % 2 == 0)
    assert ctl.running


def test_slow_candidate_breaches_on_latency_relative_to_stable() -> None:
    ctl, clock, kpis, events = make(thresholds={"min_slow": 2, "latency_floor_s": 0.1, "max_latency_ratio": 2.0})
    for _ in range(10):
        finish(ctl, kpis, clock, STABLE, latency=0.1)
    finish(ctl, kpis, clock, CAND, latency=0.15)
    assert ctl.running  # under stable p95 x 2 and p95 + floor
    finish(ctl, kpis, clock, CAND, latency=1.0)
    finish(ctl, kpis, clock, CAND, latency=1.0)
    assert ctl.state == "rolled_back" and "latency" in events[-1][1]


def test_requests_stuck_in_flight_breach_at_tick() -> None:
    ctl, clock, kpis, _ = make(thresholds={"min_slow": 2, "latency_floor_s": 0.1})
    for _ in range(10):
        finish(ctl, kpis, clock, STABLE, latency=0.1)
    kpis[CAND].begin()
    kpis[CAND].begin()  # two candidate requests that never finish
    clock.advance(0.1)
    assert ctl.tick() is None and ctl.running  # in flight for less than the limit (stable p95 x 2 = 0.2 s)
    clock.advance(5.0)
    ctl.tick()
    assert ctl.state == "rolled_back" and ctl.first_bad_at is not None


def test_abort_ends_once_and_later_observations_change_nothing() -> None:
    ctl, clock, kpis, events = make()
    ctl.end("aborted", "by hand")
    ctl.end("aborted", "twice")
    assert [e for e in events if e[0] == "aborted"] == [("aborted", "by hand")]
    finish(ctl, kpis, clock, CAND, error=True)
    finish(ctl, kpis, clock, CAND, error=True)
    assert ctl.state == "aborted" and ctl.share == 0 and ctl.tick() is None


def test_shadow_phase_mirrors_stable_traffic_then_steps() -> None:
    ctl, clock, kpis, events = make(plan={"shadow_share": 0.5, "shadow_hold_s": 20, "min_requests": 1}, seed=1)
    assert ctl.share == 0 and ctl.step == -1 and events == []
    picks = [ctl.wants_shadow(STABLE) for _ in range(400)]
    assert 150 < sum(picks) < 250  # about half of the stable traffic is mirrored
    assert not ctl.wants_shadow(CAND)  # only stable traffic is mirrored
    clock.advance(21)
    assert ctl.tick() is None and ctl.step == -1  # no mirrored answer yet: no evidence
    finish(ctl, kpis, clock, CAND, shadow=True)
    ctl.shadow_compared_with(True)
    ctl.tick()
    assert ctl.step == 0 and ctl.share == 10 and not ctl.wants_shadow(STABLE)
    assert ctl.status()["shadow"] == {"compared": 1, "agreed": 1}


def test_shadow_only_plan_ends_clean_and_never_routes_live_traffic() -> None:
    ctl, clock, kpis, events = make(plan={"steps": [], "shadow_share": 1.0, "shadow_hold_s": 5, "min_requests": 0})
    clock.advance(6)
    assert ctl.tick() is None
    assert ctl.state == "shadow_done" and ctl.share == 0 and ("share", 10.0) not in events


def test_last_step_below_100_holds_until_promoted_by_hand() -> None:
    ctl, clock, kpis, _ = make(plan={"steps": [25], "min_requests": 0, "hold_s": 1})
    clock.advance(2)
    assert ctl.tick() is None and ctl.running and ctl.share == 25
    clock.advance(100)
    assert ctl.tick() is None and ctl.running
