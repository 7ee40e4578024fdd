"""SIGTERM to `llmstack deploy` drains: new requests 503, live streams end with [DONE], exit status 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests

REPO = Path(__file__).resolve().parents[2]
from llmstack._ray import free_port
from llmstack.serve._testing import wait_healthy

PORT = free_port()  # this test's own process starts its own Ray cluster and Serve on this port
STREAMS = 4


@pytest.fixture(scope="module")
def tiny_registry(tmp_path_factory: pytest.TempPathFactory) -> str:
    from llmstack.serve._testing import make_registry

    url = str(tmp_path_factory.mktemp("drain") / "registry")
    make_registry(url, adapters=0)
    return url


def _read_stream(url: str, body: dict[str, Any], started: threading.Event, out: list[Any]) -> None:
    """Read one SSE stream to its end, recording each data payload (or the exception that cut it)."""
    try:
        with requests.post(url, json=body, stream=True, timeout=300) as response:
            out.append(response.status_code)
            for line in response.iter_lines(decode_unicode=True):
                if line.startswith("data: "):
                    payload = line[6:]
                    out.append(payload if payload == "[DONE]" else json.loads(payload))
                    started.set()
    except Exception as exc:  # noqa: BLE001 - a cut stream is what this test looks for
        out.append(exc)
    finally:
        started.set()


def test_sigterm_drains_live_streams_and_exits_cleanly(tiny_registry: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_USAGE_STATS_ENABLED="0", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")]))
    log_path = tmp_path / "deploy.log"
    # A long request timeout: admission must not shed the long stream (the drain is under test here).
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llmstack", "deploy", "model=tiny-lm@production", f"registry={tiny_registry}",
             f"http.port={PORT}", "engine.max_tokens_limit=200", "deployment.graceful_shutdown_timeout_s=4",
             "deployment.ray_actor_options.num_cpus=0.5", "http.request_timeout_s=600"],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{PORT}"
    try:
        wait_healthy(base, 240, period=0.5, process=proc, log_path=log_path)
        # Streams of 2 and (the last) 16 sequences of 200 tokens: the last cannot finish at once, so the drain
        # lasts long enough to be seen; each may end either way (finished, or ended at the deadline). Kept small:
        # on a busy 2-core machine Ray's workers (niceness 15) decode slowly.
        short = {"prompt": ["once", "upon"], "n": 1, "max_tokens": 200, "ignore_eos": True, "stream": True}
        bodies = [short] * (STREAMS - 1) + [{**short, "prompt": [f"story {i}" for i in range(8)], "n": 2}]
        results: list[list[Any]] = [[] for _ in bodies]
        threads = []
        for out, body in zip(results, bodies):
            started = threading.Event()
            thread = threading.Thread(target=_read_stream, args=(base + "/v1/completions", body, started, out))
            thread.start()
            assert started.wait(300), "no stream data within 300 s"
            threads.append(thread)

        proc.send_signal(signal.SIGTERM)
        refusal = None
        while proc.poll() is None:  # until the process has gone: once the drain shows, every request is refused
            try:
                response = requests.post(base + "/v1/completions", json={"prompt": "x", "max_tokens": 1}, timeout=30)
            except requests.RequestException:
                break
            if response.status_code == 503:
                refusal = refusal or response
            elif refusal is not None:  # after the first refusal, nothing else (a deleted app's route: 404)
                pytest.fail(f"{response.status_code} after the drain began: {response.text[:300]}")
            time.sleep(0.05)
        for thread in threads:
            thread.join(timeout=120)
        status = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = log_path.read_text()
    assert status == 0, f"exit status {status}\n{log[-3000:]}"
    assert "Aborted" not in log and "core dumped" not in log
    assert refusal is not None, "no request was refused with 503 during the drain"
    assert refusal.headers.get("Retry-After") and refusal.json()["error"]["code"] == "shutting_down"
    for out in results:
        assert out[0] == 200 and not any(isinstance(item, Exception) for item in out), out[-3:]
        assert out[-1] == "[DONE]", f"stream cut without [DONE]: {out[-3:]}"
        last = out[-2]
        ended_by_drain = "error" in last and last["error"]["code"] == "shutting_down"
        if not ended_by_drain:  # finished in full: every sequence ended at its length
            reasons = [event["choices"][0]["finish_reason"] for event in out[1:-1]]
            assert reasons.count("length") == len({event["choices"][0]["index"] for event in out[1:-1]}), last
