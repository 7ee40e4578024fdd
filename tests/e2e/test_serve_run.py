"""`serve run serve_configs/<file>.yaml` for every shipped YAML, as a user runs it (subprocess): on a local Ray
that `serve run` starts itself (tiny.yaml, HAProxy, the region file on unmarked nodes), or on the module's one
running cluster (`serve run --address`)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml

from llmstack.serve._testing import wait_healthy

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "serve_configs").glob("*.yaml"))
# multi-region.yaml and canary-in-region.yaml need nodes marked with their regions' resources: own tests below
REGION_FILE = REPO / "serve_configs" / "multi-region.yaml"
CANARY_IN_REGION_FILE = REPO / "serve_configs" / "canary-in-region.yaml"
PLAIN_CONFIGS = [c for c in CONFIGS if c not in (REGION_FILE, CANARY_IN_REGION_FILE)]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def quickstart_registry(tmp_path_factory: pytest.TempPathFactory) -> str:
    """What the quickstart leaves behind: tiny-lm@production, and tiny-lm-lora on the base it was trained on."""
    from llmstack.models import register_model
    from llmstack.serve._testing import lora_adapter, make_registry

    url = str(tmp_path_factory.mktemp("qs") / "registry")
    info = make_registry(url, adapters=0)
    base = register_model(info["registry"], "tiny-lm-base", info["torch_model"], info["tokenizer"], kind="model")
    with tempfile.TemporaryDirectory() as tmp:
        lora_adapter(info["torch_model"], tmp, seed=1)
        info["registry"].register("tiny-lm-lora", tmp, kind="adapter", parents=[str(base)])
    return url


def test_every_shipped_config_is_covered() -> None:
    assert {c.name for c in PLAIN_CONFIGS} >= {"tiny.yaml", "tiny-lora.yaml"}
    assert REGION_FILE in CONFIGS and CANARY_IN_REGION_FILE in CONFIGS


@contextlib.contextmanager
def _serve_run(config: Path, registry: str, tmp_path: Path, *, address: str = "local",
               **env_extra: str) -> Iterator[tuple[str, dict]]:
    """``serve run`` on ``config`` exactly as shipped but for a free port, until healthy; Ctrl-C at the end."""
    data = yaml.safe_load(config.read_text())
    port = _free_port()
    data["http_options"]["port"] = port  # the only change: a free port instead of 8000
    patched = tmp_path / config.name
    patched.write_text(yaml.safe_dump(data))
    app = data["applications"][0]
    base = f"http://127.0.0.1:{port}{app.get('route_prefix', '/').rstrip('/')}"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(LLMSTACK_REGISTRY=registry, RAY_USAGE_STATS_ENABLED="0", TOKENIZERS_PARALLELISM="false", **env_extra)
    serve_bin = Path(sys.executable).parent / "serve"
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([str(serve_bin), "run", "--address", address, str(patched)], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(base, 150, period=0.5, process=proc, log_path=tmp_path / "serve.log")
        yield base, app
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: serve run shuts Serve down
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.mark.slow
@pytest.mark.parametrize("config", PLAIN_CONFIGS, ids=[c.name for c in PLAIN_CONFIGS])
def test_serve_run(config: Path, quickstart_registry: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """tiny.yaml as the README runs it (``serve run`` starts a local Ray of its own); the other files on the
    module's one running cluster (``serve run --address``), which saves a Ray start and stop per file."""
    if config.name == "tiny.yaml":
        where: dict[str, str] = {}
    else:
        address, short = request.getfixturevalue("marked_cluster")
        where = {"address": address, "RAY_TMPDIR": str(short), "RAY_AUTH_MODE": "token"}
    with _serve_run(config, quickstart_registry, tmp_path, **where) as (base, app):
        models = requests.get(base + "/v1/models", timeout=10).json()["data"]
        ids = [m["id"] for m in models]
        assert ids[0] == app["args"].get("model", app["args"].get("stable", "")).partition("@")[0]  # tiny-lm, or tiny-lm-base under its adapter
        for model in ids:
            r = requests.post(base + "/v1/completions", json={"model": model, "prompt": "def add(a, b):",
                                                              "max_tokens": 8}, timeout=60)
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] >= 1
        if "adapters" in app["args"]:
            assert "tiny-lm-lora" in ids


@pytest.mark.slow
def test_serve_run_behind_haproxy(quickstart_registry: str, tmp_path: Path) -> None:
    """Serve's HAProxy ingress (the low-overhead setting RESULTS.md measures) in front of the same app:
    completions, a streamed chat, the OpenAI error shape and auth-free health all pass through it.

    Ray 2.60's HAProxy can lose its own start-up on a busy machine ("HAProxy crashed during startup ... Address
    already in use": its listener races the proxy it replaces), and ``serve run`` then exits; such a start is tried
    once more, on another port. Anything else fails at once."""
    for attempt in range(2):
        run_dir = tmp_path / f"start-{attempt}"
        run_dir.mkdir()
        try:
            # On Ctrl-C the ingress replica behind HAProxy first stays reachable for Ray's deregistration window
            # (30 s by default; nothing here is asserted about it), then drains: the window is skipped.
            with _serve_run(REPO / "serve_configs" / "tiny.yaml", quickstart_registry, run_dir,
                            RAY_SERVE_ENABLE_HA_PROXY="1", RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S="0") \
                    as (base, _app):
                _check_through_haproxy(base, run_dir / "serve.log")
            return
        except RuntimeError:  # serve run exited before it was healthy
            log = (run_dir / "serve.log").read_text(errors="replace")
            if attempt or "HAProxy crashed during startup" not in log:
                raise


def _check_through_haproxy(base: str, log_path: Path) -> None:
    r = requests.post(base + "/v1/completions", json={"prompt": "def add(a, b):", "max_tokens": 8}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1, r.text
    with requests.post(base + "/v1/chat/completions", stream=True, timeout=60,
                       json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6,
                             "stream": True}) as stream:
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        events = [line for line in stream.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and len(events) >= 3
    bad = requests.post(base + "/v1/completions", json={"prompt": "x", "max_tokens": 0}, timeout=30)
    assert bad.status_code == 400 and set(bad.json()["error"]) == {"message", "type", "param", "code"}
    log = log_path.read_text(errors="replace")
    assert "replacing Serve proxy with HAProxy" in log, log[-2000:]  # really HAProxy, not the Python proxy


@pytest.mark.slow
def test_multi_region_file_fails_fast_naming_regions_without_nodes(quickstart_registry: str, tmp_path: Path) -> None:
    """On a plain local cluster (no node marked region:us-east / region:eu-west) the app fails to deploy at
    once, naming the regions (``serve run`` itself keeps running and prints the builder's error)."""
    data = yaml.safe_load(REGION_FILE.read_text())
    data["http_options"]["port"] = _free_port()
    patched = tmp_path / REGION_FILE.name
    patched.write_text(yaml.safe_dump(data))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(LLMSTACK_REGISTRY=quickstart_registry, RAY_USAGE_STATS_ENABLED="0",
               RAY_TMPDIR=tempfile.mkdtemp(prefix="lsm-"))  # short: Ray's socket paths live under it
    serve_bin = Path(sys.executable).parent / "serve"
    log_path = tmp_path / "serve.log"
    expected = "cannot place the multi-region app: no live Ray node for region(s) "
    with log_path.open("w") as log:
        proc = subprocess.Popen([str(serve_bin), "run", "--address", "local", str(patched)], cwd=REPO, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.time() + 120
            while time.time() < deadline and expected not in log_path.read_text(errors="replace"):
                time.sleep(0.5)
            text = log_path.read_text(errors="replace")
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert expected in text, text[-3000:]
    named = text[text.index(expected):].split("\n", 1)[0]
    assert "region:us-east" in named and "region:eu-west" in named, named


@contextlib.contextmanager
def _marked_cluster(tmp_path: Path, resources: dict[str, float], **env_extra: str) -> Iterator[str]:
    """A local Ray cluster of our own whose one node holds ``resources``; owned by a holder process, so ending
    that process (and nothing else) stops it."""
    holder = ("import json, sys, ray; ray.init(num_cpus=2, object_store_memory=150 * 2**20, include_dashboard=False, "
              f"resources={resources!r}); print(ray.get_runtime_context().gcs_address, flush=True); sys.stdin.read()")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=str(tmp_path), RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token", **env_extra)
    proc = subprocess.Popen([sys.executable, "-c", holder], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        address = proc.stdout.readline().strip()  # type: ignore[union-attr]
        assert address, "the holder's Ray cluster did not start"
        yield address
    finally:
        proc.stdin.close()  # type: ignore[union-attr]
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def marked_cluster(quickstart_registry: str) -> Iterator[tuple[str, Path]]:
    """One 2-CPU node holding both regions' markers, shared by this module's ``serve run --address`` tests (each
    ``serve run`` shuts Serve down on Ctrl-C, so no app outlives its test): ``(address, its RAY_TMPDIR)``."""
    short = Path(tempfile.mkdtemp(prefix="lsm-"))  # Ray's socket paths must stay short
    # `serve run` builds the app on the cluster: the registry is found through the cluster's environment
    with _marked_cluster(short, {"region:us-east": 1, "region:eu-west": 1},
                         LLMSTACK_REGISTRY=quickstart_registry, TOKENIZERS_PARALLELISM="false") as address:
        yield address, short


@pytest.mark.slow
def test_serve_run_multi_region_on_marked_nodes(quickstart_registry: str, tmp_path: Path,
                                               marked_cluster: tuple[str, Path]) -> None:
    """The shipped multi-region file on one 2-CPU node holding both regions' markers (as its comments say)."""
    address, short = marked_cluster
    with _serve_run(REGION_FILE, quickstart_registry, tmp_path, address=address, RAY_TMPDIR=str(short),
                    RAY_AUTH_MODE="token") as (base, _app):
        seen = set()
        for _ in range(8):
            r = requests.post(base + "/v1/completions", json={"prompt": "def add(a, b):", "max_tokens": 8},
                              timeout=60)
            assert r.status_code == 200, r.text
            seen.add(r.headers["x-llmstack-region"])
            assert float(r.headers["x-llmstack-cost-usd"]) > 0
        assert seen <= {"us-east", "eu-west"} and seen
        status = requests.get(base + "/regions", timeout=10).json()
        assert set(status["regions"]) == {"us-east", "eu-west"} and status["policy"] == "cost"
        cli = subprocess.run([sys.executable, "-m", "llmstack", "cost", "--url", base], capture_output=True,
                             text=True, timeout=60)
        assert cli.returncode == 0 and "TOTAL" in cli.stdout, cli.stderr


@pytest.mark.slow
def test_serve_run_canary_in_region_on_marked_nodes(quickstart_registry: str, tmp_path: Path,
                                                    marked_cluster: tuple[str, Path]) -> None:
    """The shipped canary-in-region file on one 2-CPU node holding both regions' markers: eu-west answers with
    a version header (its canary), us-east without; /canary?region=eu-west shows the plan running."""
    address, short = marked_cluster
    with _serve_run(CANARY_IN_REGION_FILE, quickstart_registry, tmp_path, address=address,
                    RAY_TMPDIR=str(short), RAY_AUTH_MODE="token") as (base, _app):
        seen: dict[str, set] = {}
        for _ in range(8):  # round robin: both regions answer
            r = requests.post(base + "/v1/completions", json={"prompt": "def add(a, b):", "max_tokens": 8},
                              timeout=60)
            assert r.status_code == 200, r.text
            seen.setdefault(r.headers["x-llmstack-region"], set()).add(r.headers.get("x-llmstack-version"))
        assert set(seen) == {"us-east", "eu-west"}
        assert seen["us-east"] == {None} and None not in seen["eu-west"], seen
        canary = requests.get(base + "/canary?region=eu-west", timeout=10).json()
        assert canary["region"] == "eu-west" and canary["canary"]["state"] == "running", canary


def test_missing_model_tells_to_run_the_quickstart(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["LLMSTACK_REGISTRY"] = str(tmp_path / "empty-registry")
    code = "from llmstack.serve import build_app; build_app({'model': 'tiny-lm@production'})"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "make quickstart" in result.stderr


