"""Multi-region serving on a real multi-node local Ray cluster (head + one node per region).

The cluster is started by ``regions_driver.py`` in a subprocess of its own (this session's shared Ray
cluster lives in the test process), with its own ports and RAY_TMPDIR, and removed when it ends, also on
failure (the subprocess's process group is killed if it overruns). The driver reports JSON; the checks
are here: placement per region, routing per policy, a region with no node, an SLO no region meets,
failover on a killed region's node (its raylet SIGKILLed) with the retry-once rule, re-admission, cost
counters, and an override reaching both of two router replicas.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

HERE = Path(__file__).parent
SRC = HERE.parents[2] / "src"
DRIVER_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def result() -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="lsr-") as tmp:  # short: Ray's socket paths live under it
        out = Path(tmp) / "result.json"
        env = {**os.environ, "RAY_TMPDIR": tmp, "PYTHONPATH": os.pathsep.join(
            [str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])]), "RAY_ADDRESS": "",
            "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
        env.pop("RAY_ADDRESS")
        proc = subprocess.Popen([sys.executable, str(HERE / "regions_driver.py"), "--out", str(out)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            log, _ = proc.communicate(timeout=DRIVER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and the cluster it started, nothing else
            log, _ = proc.communicate()
            pytest.fail(f"the multi-region driver overran {DRIVER_TIMEOUT_S} s:\n{log[-4000:]}")
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        data = json.loads(out.read_text()) if out.is_file() else {"ok": False, "error": "no result"}
        keep = Path(tempfile.gettempdir()) / "llmstack-regions-last-result.json"  # for a look after a failure
        keep.write_text(json.dumps(data, default=str))
        if not data.get("ok"):
            pytest.fail(f"driver failed: {data.get('error')}\n{data.get('traceback', '')}\n{log[-4000:]}")
        return data


def test_a_region_without_nodes_fails_the_deploy_by_name(result: dict[str, Any]) -> None:
    assert "sa-east" in result["missing_region_error"]
    assert "us-east" not in result["missing_region_error"]
    assert result["missing_region_error_s"] < 5


def test_replicas_are_pinned_to_their_regions_nodes(result: dict[str, Any]) -> None:
    for placement in (result["placement"], result["placement_final"]):
        for region in ("us-east", "eu-west", "ap-south"):
            assert placement[f"LLMServer-{region}"] == [[f"region:{region}"]]
        assert placement["RegionIngress"] == [[]]  # the router on the head, no region's node


def test_cost_policy_explores_then_takes_the_cheapest_region_meeting_the_slo(result: dict[str, Any]) -> None:
    regions = result["cost_regions"]
    assert regions[:3] == ["ap-south"] * 3  # cheapest, unmeasured: explored first
    assert Counter(regions[9:]) == {"eu-west": 9}  # ap-south misses the SLO (700 ms away); eu-west is next
    status = result["status_after_cost"]["regions"]
    assert status["ap-south"]["slo_met"] is False and status["eu-west"]["slo_met"] is True


def test_latency_round_robin_and_manual_weights(result: dict[str, Any]) -> None:
    assert "ap-south" not in result["latency_regions"]
    assert Counter(result["round_robin_regions"]) == {"us-east": 4, "eu-west": 4, "ap-south": 4}
    assert set(result["weights_regions"]) == {"us-east"}
    assert result["bad_weights"]["status_code"] == 400
    assert "weights.mars: unknown region" in result["bad_weights"]["error"]["message"]


def test_an_slo_no_region_meets_is_served_and_flagged(result: dict[str, Any]) -> None:
    assert len(result["unmet_regions"]) == 4  # all answered (200), by the fastest region
    assert result["unmet_status"] is True
    assert result["unmet_metric"] == ["llmstack_region_slo_unmet 1.0"]


def test_failover_on_a_killed_region_retries_once_and_loses_nothing(result: dict[str, Any]) -> None:
    kill = result["kill_at"]
    samples = result["failover_samples"]
    after = [s for s in samples if s["sent"] >= kill]
    assert after
    # Nothing is lost: a stream whose output had begun on eu-west when it died continues on another region
    # (resumed after the tokens it had delivered; its headers, sent before, name eu-west and no retry).
    lost = [s for s in samples if s["status"] != 200]
    assert not lost, Counter((s["status"], s["region"], s["stream"]) for s in lost)
    resumed = result["resumed_after_kill"]
    assert resumed <= 1  # one streaming client: at most its one stream in flight
    answers: dict[str, set[str]] = {}  # greedy: one text per prompt, whichever region answered or resumed it
    for s in samples:
        answers.setdefault(s["prompt"], set()).add(s["text"])
    assert any(s["stream"] for s in samples)
    assert all(len(texts) == 1 for texts in answers.values()), {p: t for p, t in answers.items() if len(t) > 1}
    eu = result["status_after_kill"]["regions"]["eu-west"]
    assert eu["healthy"] is False
    assert eu["ejected_at_wall"] - kill < 12  # two 3 s probe timeouts at most (or a dead actor's error)
    late = [s for s in samples if s["sent"] > eu["ejected_at_wall"] + 0.5]
    assert late and all(s["region"] != "eu-west" for s in late), [s for s in late if s["region"] == "eu-west"]
    retried = [s for s in samples if s["retried"]]
    # every attempt that failed on eu-west, or waited on it when it was ejected, came back as one retried
    # answer from another region, or as a resumed stream
    assert all(s["region"] != "eu-west" for s in retried)
    assert retried and len(retried) + resumed == eu["totals"]["failed"] + eu["totals"]["moved"], \
        (retried, resumed, eu["totals"])


def test_a_new_node_in_the_region_is_readmitted_and_takes_traffic(result: dict[str, Any]) -> None:
    assert result["readmit_wait_s"] is not None and result["readmit_wait_s"] < 150
    status = result["status_final"]["regions"]["eu-west"]
    assert status["healthy"] is True and status["readmitted_at_wall"] > result["add_at"]
    answered = [s for s in result["readmit_samples"] if s["region"] == "eu-west" and s["status"] == 200]
    assert answered
    assert all(s["status"] == 200 for s in result["readmit_samples"])


def test_an_override_posted_to_one_of_two_router_replicas_reaches_both(result: dict[str, Any]) -> None:
    assert len(result["placement_two_routers"]) == 2
    assert len(result["views_before"]) == 2 and all(w == {} for w in result["views_before"].values())
    post = result["override_post"]
    assert post["status_code"] == 200 and post["shared"] is True and post["weights"] == {"ap-south": 1.0}
    assert result["override_wait_s"] is not None, result["override_views"]  # within 30 s (sync every 0.5 s)
    assert set(result["override_views"]) == set(result["views_before"])
    assert all(w == {"ap-south": 1.0} for w in result["override_views"].values())


def test_cost_counters_are_replica_seconds_times_price(result: dict[str, Any]) -> None:
    report = result["cost_report"]["regions"]
    for region, price in result["prices"].items():
        seconds = result["replica_seconds"][region]
        assert seconds > 0 and report[region]["tokens"] > 0
        assert report[region]["cost_usd"] == pytest.approx(seconds * price / 3600, rel=1e-6)
    assert result["cost_report"]["total"]["usd_per_1k_tokens"] > 0
