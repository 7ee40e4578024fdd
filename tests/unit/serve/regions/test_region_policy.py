"""The pure region router: each policy's choice, exploration, SLO fallback, ejection and re-admission (fake clock)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from llmstack.errors import ConfigError, RequestError
from llmstack.serve.routing.region_policy import RegionRouter

REGIONS = {
    "us-east": {"price_per_replica_hour": 3.0, "latency_ms": 0, "capacity": 4},
    "eu-west": {"price_per_replica_hour": 1.5, "latency_ms": 40, "capacity": 4},
    "ap-south": {"price_per_replica_hour": 0.8, "latency_ms": 400, "capacity": 4},
}


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def router(policy: str = "cost", **routing: object) -> tuple[RegionRouter, Clock]:
    clock = Clock()
    cfg = {"policy": policy, "slo_p95_s": 0.3, "min_samples": 3, "window_s": 30, **routing}
    return RegionRouter(REGIONS, cfg, clock=clock, rng=random.Random(0)), clock


def feed(r: RegionRouter, region: str, latency: float, n: int = 3) -> None:
    for _ in range(n):
        r.begin(region)
        r.succeeded(region, latency)


def test_cost_explores_cheapest_first_then_takes_cheapest_meeting_slo() -> None:
    r, _ = router("cost")
    assert r.choose().region == "ap-south" and r.choose().reason == "explore"
    feed(r, "ap-south", 0.45)  # too slow for the 0.3 s SLO
    assert r.choose().region == "eu-west"
    feed(r, "eu-west", 0.1)
    feed(r, "us-east", 0.06)
    choice = r.choose()
    assert (choice.region, choice.slo_met, choice.reason) == ("eu-west", True, "policy")


def test_in_flight_requests_count_as_samples_on_their_way() -> None:
    r, _ = router("cost")
    for _ in range(3):
        r.begin(r.choose().region)
    assert r.regions["ap-south"].in_flight == 3
    assert r.choose().region == "eu-west"  # ap-south has enough samples coming


def test_no_region_meets_the_slo_best_serves_and_is_flagged() -> None:
    r, _ = router("cost")
    feed(r, "ap-south", 0.9)
    feed(r, "eu-west", 0.5)
    feed(r, "us-east", 0.4)
    choice = r.choose()
    assert (choice.region, choice.slo_met) == ("us-east", False)
    assert r.slo_unmet() and r.status()["slo_unmet"] is True


def test_latency_policy_picks_lowest_p95() -> None:
    r, _ = router("latency")
    assert r.choose().region == "us-east"  # explored first: smallest offset
    feed(r, "us-east", 0.2)
    feed(r, "eu-west", 0.1)
    feed(r, "ap-south", 0.5)
    assert r.choose().region == "eu-west"


def test_round_robin_cycles_and_skips_ejected() -> None:
    r, _ = router("round_robin")
    picks = [r.choose().region for _ in range(6)]
    assert Counter(picks) == {"us-east": 2, "eu-west": 2, "ap-south": 2}
    r.failed("eu-west", hard=True)
    assert {r.choose().region for _ in range(6)} == {"us-east", "ap-south"}


def test_weights_override_the_policy_and_are_validated() -> None:
    r, _ = router("cost")
    r.set_weights({"us-east": 3, "eu-west": 1})
    picks = Counter(r.choose().region for _ in range(400))
    assert picks["ap-south"] == 0 and 250 < picks["us-east"] < 350
    with pytest.raises(ConfigError, match="weights.mars: unknown region"):
        r.set_weights({"mars": 1})
    with pytest.raises(ConfigError, match="must be >= 0"):
        r.set_weights({"us-east": -1})
    r.set_weights({})
    assert r.choose().region == "ap-south"  # back to the cost policy


def test_ejection_after_consecutive_failures_and_readmission_after_probes() -> None:
    r, clock = router("round_robin", eject_after_failures=2, readmit_after_probes=2)
    r.begin("us-east")
    r.failed("us-east")
    assert r.regions["us-east"].healthy
    r.begin("us-east")
    r.succeeded("us-east", 0.1)  # a success resets the streak
    r.failed("us-east")
    assert r.regions["us-east"].healthy
    r.probed("us-east", False)
    assert not r.regions["us-east"].healthy and r.regions["us-east"].ejected_at == clock.t
    assert "us-east" not in {r.choose().region for _ in range(6)}
    clock.t += 5
    r.probed("us-east", True)
    r.probed("us-east", False)  # the streak of passes starts over
    r.probed("us-east", True)
    assert not r.regions["us-east"].healthy
    r.probed("us-east", True)
    assert r.regions["us-east"].healthy and r.regions["us-east"].readmitted_at == clock.t
    assert [e["event"] for e in r.events] == ["suspect", "suspect", "ejected", "readmitted"]
    assert r.regions["us-east"].totals["ejections"] == 1


def test_one_failure_routes_around_the_region_at_once_and_ejects_only_after_confirmation() -> None:
    r, clock = router("round_robin", eject_after_failures=3)
    r.begin("eu-west")
    r.failed("eu-west", reason="timeout")  # first sign: still healthy (not ejected), but no new traffic
    eu = r.regions["eu-west"]
    assert eu.healthy and r.status()["regions"]["eu-west"]["suspect"] is True
    assert "eu-west" not in {r.choose().region for _ in range(12)}
    clock.t += 1
    r.probed("eu-west", False)  # second sign: still not ejected (3 needed), still routed around
    assert eu.healthy and "eu-west" not in {r.choose().region for _ in range(6)}
    r.probed("eu-west", True)  # a passing probe clears the suspicion: back in the rotation
    assert r.status()["regions"]["eu-west"]["suspect"] is False
    assert Counter(r.choose().region for _ in range(9)) == {"us-east": 3, "eu-west": 3, "ap-south": 3}
    assert [e["event"] for e in r.events] == ["suspect"]


def test_a_timed_out_probe_routes_around_a_region_that_served_before() -> None:
    r, _ = router("cost")
    for name in REGIONS:
        feed(r, name, 0.1)
    assert r.choose().region == "ap-south"
    r.probed("ap-south", False)  # one timed-out probe: the next cheapest takes the traffic now
    assert r.regions["ap-south"].healthy and r.choose().region == "eu-west"


def test_a_suspect_still_serves_when_no_trusted_region_has_room() -> None:
    r, _ = router("round_robin")
    r.failed("us-east")
    for name in ("eu-west", "ap-south"):
        for _ in range(4):
            r.begin(name)  # full
    assert r.choose().region == "us-east"  # healthy with room: better than queueing on a full region
    r.failed("eu-west")
    r.failed("ap-south")  # every region suspect (and eu-west, ap-south have room again): the policy over all
    assert {r.choose().region for _ in range(6)} == set(REGIONS)


def test_a_slow_probe_routes_around_without_counting_toward_ejection() -> None:
    r, _ = router("cost", eject_after_failures=2)
    for name in REGIONS:
        feed(r, name, 0.1)
    r.probe_slow("ap-south")
    ap = r.regions["ap-south"]
    assert ap.healthy and ap.failures == 0 and r.choose().region == "eu-west"
    r.probed("ap-south", False)  # the probe then times out: one failure, still not ejected
    assert ap.healthy and r.choose().region == "eu-west"
    r.probed("ap-south", True)
    assert r.choose().region == "ap-south"
    r.probe_slow("ap-south")
    r.begin("ap-south")
    r.succeeded("ap-south", 0.1)  # an answered request clears it too
    assert r.choose().region == "ap-south"
    assert [e["event"] for e in r.events] == ["suspect", "suspect"]


def test_another_replicas_ejection_ejects_here_once() -> None:
    r, clock = router("cost")
    assert r.eject("ap-south", reason="peer") is True
    assert not r.regions["ap-south"].healthy and r.regions["ap-south"].ejected_at == clock.t
    assert r.eject("ap-south", reason="peer") is False
    assert r.regions["ap-south"].totals["ejections"] == 1
    assert r.choose().region == "eu-west"


def test_hard_failure_ejects_at_once() -> None:
    r, _ = router("cost", eject_after_failures=5)
    r.begin("ap-south")
    r.failed("ap-south", hard=True, reason="backend_unavailable")
    assert not r.regions["ap-south"].healthy
    assert r.choose().region == "eu-west"


def test_every_region_ejected_still_tries_and_exclusion_can_exhaust() -> None:
    r, _ = router("cost")
    for name in REGIONS:
        r.failed(name, hard=True)
    choice = r.choose()
    assert choice.reason == "fallback"
    with pytest.raises(RequestError) as info:
        r.choose(exclude=list(REGIONS))
    assert info.value.status_code == 503 and info.value.code == "no_region"


def test_full_regions_are_skipped_while_others_have_room() -> None:
    r, _ = router("cost")
    for _ in range(4):
        r.begin("ap-south")
    assert r.choose().region == "eu-west"
    for name in ("eu-west", "us-east"):
        for _ in range(4):
            r.begin(name)
    assert r.choose().reason == "fallback"


def test_old_samples_are_forgotten_so_a_slow_region_is_retried() -> None:
    r, clock = router("cost")
    feed(r, "ap-south", 0.9)
    assert r.choose().region == "eu-west"
    clock.t += 31
    assert r.p95("ap-south") is None
    assert r.choose().region == "ap-south"


def test_retry_exclusion_picks_the_next_best() -> None:
    r, _ = router("cost")
    feed(r, "ap-south", 0.1)
    feed(r, "eu-west", 0.1)
    feed(r, "us-east", 0.1)
    assert r.choose(exclude=["ap-south"]).region == "eu-west"


def test_released_gives_no_health_evidence() -> None:
    r, _ = router("cost")
    r.begin("us-east")
    r.released("us-east")
    assert r.regions["us-east"].failures == 0 and r.regions["us-east"].in_flight == 0


def test_failed_probes_of_a_region_still_starting_do_not_eject_it() -> None:
    r, _ = router("cost")
    for _ in range(5):
        r.probed("us-east", False)
    assert r.regions["us-east"].healthy
    r.probed("us-east", True)
    r.probed("us-east", False)
    r.probed("us-east", False)
    assert not r.regions["us-east"].healthy
