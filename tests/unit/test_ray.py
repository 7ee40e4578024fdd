"""The pure parts of llmstack._ray (address resolution, placement arithmetic, polling, ports), without Ray."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import time

import pytest

from llmstack import _ray
from llmstack.errors import ResourceError


@pytest.mark.parametrize(("address", "environ", "require_running", "expected"), [
    ("ray://head:10001", {"RAY_ADDRESS": "other:6379"}, False, "ray://head:10001"),  # the caller's wins
    (None, {"RAY_ADDRESS": "10.0.0.2:6379"}, False, "10.0.0.2:6379"),
    ("", {"RAY_ADDRESS": " 10.0.0.2:6379 "}, True, "10.0.0.2:6379"),  # blank is unset; spaces trimmed
    (None, {"RAY_ADDRESS": "  "}, True, "auto"),  # a running cluster is required: Ray must not start one
    (None, {}, False, None),  # Ray finds the latest local cluster or starts one
])
def test_address_precedence(address: str | None, environ: dict[str, str], require_running: bool,
                            expected: str | None) -> None:
    assert _ray.resolve_address(address, require_running=require_running, environ=environ) == expected


def test_worker_env_is_merged_with_the_callers() -> None:
    assert _ray.worker_runtime_env() == {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}
    merged = _ray.worker_runtime_env({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "true"})
    assert merged == {"env_vars": {"TOKENIZERS_PARALLELISM": "true", "HF_HUB_OFFLINE": "1"}}


NODES = [{"CPU": 4.0}, {"CPU": 2.0, "GPU": 1.0}]
TOTAL = {"CPU": 6.0, "GPU": 1.0}


def test_replicas_that_fit_have_no_problems() -> None:
    needs = [({"CPU": 1.0}, 3), ({"CPU": 0.1}, 2)]
    assert _ray.placement_problems(needs, nodes=NODES, free={"CPU": 3.5}, total=TOTAL) == []


def test_nothing_asked_is_no_problem_even_on_an_empty_cluster() -> None:
    needs = [({"CPU": 0.0, "GPU": 0.0}, 3), ({"CPU": 2.0}, 0)]
    assert _ray.placement_problems(needs, nodes=[], free={}, total={}) == []


def test_every_shortfall_is_named_with_its_plan() -> None:
    problems = _ray.placement_problems([({"CPU": 3.0, "GPU": 1.0}, 2), ({"CPU": 0.1}, 1)], nodes=NODES,
                                       free={"CPU": 5.0, "GPU": 1.0}, total=TOTAL)
    assert problems == [
        "its replicas ask for 6.1 CPUs (deployment.ray_actor_options.num_cpus: 2 x 3 + 1 x 0.1) but the cluster "
        "has 5 of 6 free; lower deployment.ray_actor_options.num_cpus or autoscaling.min_replicas, or stop other apps",
        "its replicas ask for 2 GPUs (deployment.ray_actor_options.num_gpus: 2 x 1) but the cluster has 1 of 1 free; "
        "set deployment.ray_actor_options.num_gpus: 0 to serve on CPUs, or add GPU nodes"]


def test_what_a_replaced_app_holds_counts_as_free() -> None:
    needs = [({"CPU": 2.0}, 2)]
    assert _ray.placement_problems(needs, nodes=NODES, free={"CPU": 1.0}, total=TOTAL)
    assert _ray.placement_problems(needs, nodes=NODES, free={"CPU": 1.0}, total=TOTAL, released={"CPU": 3.0}) == []


def test_a_replica_bigger_than_every_node_is_refused_even_when_the_total_fits() -> None:
    problems = _ray.placement_problems([({"CPU": 5.0}, 1)], nodes=NODES, free=TOTAL, total=TOTAL)
    assert problems == ["a replica asks for 5 CPUs (deployment.ray_actor_options.num_cpus) but the largest node "
                        "has 4; lower deployment.ray_actor_options.num_cpus "
                        "(compute threads are set by engine.num_threads, independently)"]


def test_a_replica_must_fit_on_one_node_as_a_whole() -> None:
    # 3 CPUs fit on the first node and the GPU on the second, but no node has both at once.
    problems = _ray.placement_problems([({"CPU": 3.0, "GPU": 1.0}, 1)], nodes=NODES, free=TOTAL, total=TOTAL)
    assert problems == ["no node has 3 CPU, 1 GPU at once for one replica"]


def test_held_resources_multiply_by_running_replicas() -> None:
    app = {"deployments": {
        "LLMServer": {"replicas": [{}, {}, {}], "required_resources": {"CPU": 0.5, "GPU": 0}},
        "OpenAIIngress": {"replicas": [{}], "required_resources": {"CPU": 0.1}},
        "Starting": {"replicas": [], "required_resources": {"CPU": 8.0}}}}
    assert _ray.held_resources(app) == pytest.approx({"CPU": 1.6, "GPU": 0.0})
    assert _ray.held_resources({}) == {}


def test_poll_returns_the_first_answer() -> None:
    answers = iter([None, None, "ready"])
    assert _ray.poll(lambda: next(answers), timeout_s=5, interval_s=0.001) == "ready"


def test_poll_gives_up_after_the_deadline_having_asked_once_more() -> None:
    calls: list[float] = []

    def never() -> None:
        calls.append(time.monotonic())

    assert _ray.poll(never, timeout_s=0.05, interval_s=0.01) is None
    assert len(calls) >= 2 and calls[-1] - calls[0] >= 0.05


def test_a_listening_port_is_in_use_and_refused() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert _ray.port_in_use("0.0.0.0", port)
        with pytest.raises(ResourceError, match=f"port {port} on 127.0.0.1 is already in use"):
            _ray.check_port_free("", port)
    assert not _ray.port_in_use("127.0.0.1", port)
    _ray.check_port_free("127.0.0.1", _ray.free_port())


def test_serve_failure_message_is_the_replicas_error_line() -> None:
    class Dep:
        message = "Traceback (most recent call last):\n  File x\nllmstack.errors.ModelLoadError: no such model\n"

    class State:
        deployments = {"LLMServer": Dep()}
        message = "app failed"

    assert _ray.failure_message(State()) == "LLMServer: llmstack.errors.ModelLoadError: no such model"
    assert _ray.failure_message(None) == ""


def test_importing_it_does_not_import_ray() -> None:
    code = "import sys, llmstack._ray as r; assert not r.is_connected(); print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"


def test_the_private_serve_calls_were_checked_against_the_installed_ray() -> None:
    """Upgrading Ray fails here until serve_client / serve_http_address / serve_applications / announce_ray_logs
    are re-read against the new release and CHECKED_RAY_VERSION is moved."""
    from importlib.metadata import version

    assert version("ray") == _ray.CHECKED_RAY_VERSION


class _FakeRay:
    """Stands in for the ``ray`` module: records ``ray.init`` calls, optionally failing to connect."""

    def __init__(self, *, initialized: bool = False, refuse: bool = False) -> None:
        self.initialized, self.refuse, self.calls = initialized, refuse, []

    def is_initialized(self) -> bool:
        return self.initialized

    def init(self, **kwargs: object) -> None:
        self.calls.append(kwargs)
        if self.refuse:
            raise ConnectionError("Could not find any running Ray instance")
        self.initialized = True


def test_connect_passes_the_resolved_address_and_the_console_options(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeRay()
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.2:6379")
    monkeypatch.setenv("LLMSTACK_VERBOSE", "1")  # no log-folder announcement to reach into Ray for
    assert _ray.connect(runtime_env=_ray.worker_runtime_env()) is True
    assert fake.calls == [{"address": "10.0.0.2:6379", "log_to_driver": True, "logging_level": logging.INFO,
                           "runtime_env": {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}}]
    assert _ray.connect("elsewhere:6379") is False and len(fake.calls) == 1  # already connected: untouched


def test_connect_to_no_running_cluster_names_the_address(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeRay(refuse=True)
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ResourceError, match=r"no Ray cluster answers at 'auto' .*RAY_ADDRESS"):
        _ray.connect(require_running=True)
    assert "runtime_env" not in fake.calls[0]  # none asked for, none passed
