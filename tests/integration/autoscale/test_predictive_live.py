"""A real Serve app with the predictive policy, replayed a short ramp over real HTTP: it scales up
(Serve's controller calling PredictivePolicy) while the queue is still shallow, before Serve's
queue-depth rule would have asked for a replica."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from llmstack.autoscale import Trace, replay, serve_replica_probe, synthetic_trace

pytestmark = pytest.mark.ray
TARGET_ONGOING = 4.0


def _evenly_spaced(segments: list[tuple[float, float]], *, context_tokens: int, generated_tokens: int) -> Trace:
    """Arrivals at exactly ``rate`` per second in each ``(duration_s, rate)`` segment (no Poisson clusters)."""
    arrivals, start = [], 0.0
    for duration, rate in segments:
        arrivals += [start + (i + 0.5) / rate for i in range(int(duration * rate))]
        start += duration
    return Trace(arrivals, [context_tokens] * len(arrivals), [generated_tokens] * len(arrivals))


@pytest.fixture(scope="module")
def predictive_app(ray_cluster: dict, tmp_path_factory: pytest.TempPathFactory) -> Any:
    import llmstack
    from llmstack.serve._testing import make_registry, serve_http_port

    info = make_registry(str(tmp_path_factory.mktemp("autoscale") / "registry"), adapters=0)
    port = serve_http_port()
    url = f"http://127.0.0.1:{port}/auto"
    deployment = llmstack.deploy({
        "model": info["model"], "registry": info["registry"].url, "app_name": "autoscale",
        "http": {"route_prefix": "/auto", "port": port},
        "engine": {"max_batch_size": 8, "response_cache_size": 0}, "deployment": {"max_ongoing_requests": 32},
        "autoscaling": {"policy": "predictive", "min_replicas": 1, "max_replicas": 2,
                        "target_ongoing_requests": TARGET_ONGOING, "metrics_interval_s": 0.5,
                        "look_back_period_s": 2.0,
                        "predictive": {"capacity_tokens_per_s": 600.0, "headroom": 0.2, "forecast_bin_s": 1.0,
                                       "forecast_horizon_s": 4.0, "downscale_stable_s": 60.0, "metrics_url": url}}})
    yield deployment
    deployment.shutdown()


def test_predictive_policy_scales_a_live_app_before_the_queue_builds(predictive_app: Any) -> None:
    # 8 s quiet, then a ramp to ~8 requests/s of ~100-token prompts: ~860 tokens/s, above one replica's
    # configured 600 tokens/s, while each request takes well under a second (a shallow queue).
    trace = _evenly_spaced([(8, 1.0), (5, 4.0), (12, 8.0)], context_tokens=96, generated_tokens=12)
    # Warm the fresh replica up first (its first requests are slow), so the queue it builds then is not
    # mistaken for the ramp; the policy sees this traffic as its history.
    warm_up = replay(synthetic_trace([(6, 1.5)], context_tokens=96, generated_tokens=12, seed=8),
                     predictive_app.url, max_duration_s=30.0, progress=False)
    assert warm_up.metrics["ok"] == warm_up.metrics["requests"]
    time.sleep(3.0)
    provisioned = serve_replica_probe("autoscale", include_starting=True)
    assert provisioned() == 1
    scaled: list[float] = []
    start = time.perf_counter()
    stop = threading.Event()

    def watch() -> None:  # the moment the controller asked for the second replica
        while not stop.is_set() and not scaled:
            count = provisioned()
            if count is not None and count >= 2:
                scaled.append(time.perf_counter() - start)
            stop.wait(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    result = replay(trace, predictive_app.url, ttft_slo_s=2.0, max_duration_s=45.0, request_timeout_s=20.0,
                    replica_probe=provisioned, progress=False)
    stop.set()
    watcher.join(timeout=2)
    assert result.metrics["ok"] >= 0.95 * len(trace), result.metrics["statuses"]
    assert scaled, f"no scale-up; replicas seen: {result.replicas}"
    assert result.replicas[-1][1] == 2  # and held it to the end of the ramp (no flapping back)
    # The queue at the decision: requests in flight then (from the client's own records).
    decided = scaled[0]
    in_flight = sum(1 for r in result.records if r["sent_s"] is not None and r["latency_s"] is not None
                    and r["sent_s"] <= decided <= r["sent_s"] + r["latency_s"])
    assert in_flight < TARGET_ONGOING, (decided, in_flight)
    assert decided > 8.0  # it waited for the load: the quiet start did not trigger it
