"""The placement check: every shortfall (CPUs, GPUs) named in one error, and what a replaced app frees counted."""

from __future__ import annotations

import pytest

from llmstack.errors import ResourceError
from llmstack._ray import app_resources, check_placement
from llmstack.serve.deployments.builder import INGRESS_CPUS

pytestmark = pytest.mark.ray


def test_every_shortfall_is_named_in_one_error(ray_cluster: dict) -> None:
    with pytest.raises(ResourceError) as failure:
        check_placement([({"CPU": 3.0, "GPU": 1.0}, 2), ({"CPU": INGRESS_CPUS}, 1)])
    message = str(failure.value)
    assert message.startswith("cannot place the app: ")
    cpus, gpus = "deployment.ray_actor_options.num_cpus", "deployment.ray_actor_options.num_gpus"
    assert f"its replicas ask for 6.1 CPUs ({cpus}: 2 x 3 + 1 x 0.1) but the cluster has" in message
    assert f"of {ray_cluster['num_cpus']:g} free; lower {cpus} or autoscaling.min_replicas" in message
    assert f"its replicas ask for 2 GPUs ({gpus}: 2 x 1) but the cluster has 0 of 0 free; set {gpus}: 0" in message


def test_nothing_asked_places(ray_cluster: dict) -> None:
    check_placement([({"CPU": 0.0, "GPU": 0.0}, 3), ({"CPU": 2.0}, 0)])


def test_replacing_an_app_counts_what_its_replicas_hold(main_app) -> None:
    import ray
    from ray import serve

    deployments = serve.status().applications["main"].deployments
    model = int(deployments["LLMServer"].replica_states.get("RUNNING", 0))
    ingress = int(deployments["OpenAIIngress"].replica_states.get("RUNNING", 0))
    held = app_resources("main")
    assert held.get("CPU") == pytest.approx(0.5 * model + INGRESS_CPUS * ingress)  # main_app: num_cpus 0.5
    assert not held.get("GPU")
    assert app_resources("no-such-app") == {}

    ask = ray.available_resources().get("CPU", 0.0) + held["CPU"] / 2  # over what is free, within what main frees
    with pytest.raises(ResourceError, match="ask for .* CPUs"):
        check_placement([({"CPU": ask}, 1)])
    check_placement([({"CPU": ask}, 1)], freed="main")
