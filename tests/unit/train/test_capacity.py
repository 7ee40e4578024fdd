"""Whether a job fits an autoscaling cluster, judged by the node types its autoscaler can add (no Ray)."""

from __future__ import annotations

import json

import pytest
from ray.core.generated import autoscaler_pb2

from llmstack.config import WorkersConfig
from llmstack.errors import ConfigError, ResourceError
from llmstack.train import capacity
from llmstack.train.capacity import (
    NODE_GROUPS_ENV,
    UNLIMITED,
    AutoscalerLimits,
    NodeGroup,
    fit_problem,
    limits_from_autoscaling_config,
    limits_from_cluster_config,
    most_workers,
    published_limits,
    worker_shape,
)
from llmstack.fleet.local_cluster import autoscaling_config
from llmstack.train.driver import check_autoscaling_fit, check_fixed_fit

HEAD_ONLY_NOW = {"CPU": 0.0}  # what an autoscaling cluster with no worker node up reports


def local_limits(max_nodes: int, cpus_per_node: int = 1) -> AutoscalerLimits:
    config = autoscaling_config("127.0.0.1:1", min_nodes=0, max_nodes=max_nodes, cpus_per_node=cpus_per_node)
    limits = limits_from_autoscaling_config(config)
    assert limits is not None
    return limits


def test_the_local_autoscaling_config_reads_as_a_head_and_one_scalable_group() -> None:
    limits = local_limits(max_nodes=3, cpus_per_node=2)
    head, workers = limits.node_types
    assert (head.name, head.resources["CPU"], head.max_count) == ("ray.head.default", 0.0, 1)
    assert (workers.name, workers.resources["CPU"], workers.min_count, workers.max_count) == ("cpu2", 2.0, 0, 3)
    assert limits.max_nodes == 3 and limits.scales
    fixed = limits_from_autoscaling_config({**autoscaling_config("h:1", min_nodes=2, max_nodes=2), "max_workers": 2})
    assert fixed is not None and not fixed.scales  # min == max: nothing to add


def test_the_gcs_cluster_config_reads_as_node_groups_with_caps() -> None:
    config = autoscaler_pb2.ClusterConfig()
    group = config.node_group_configs.add(name="gpu", min_count=0, max_count=2)
    group.resources["CPU"], group.resources["GPU"] = 8, 1
    config.node_group_configs.add(name="cpu", min_count=1, max_count=-1).resources["CPU"] = 4
    config.max_resources["CPU"] = 20
    limits = limits_from_cluster_config(config)
    assert limits is not None and limits.scales
    assert [(t.name, dict(t.resources), t.max_count) for t in limits.node_types] == [
        ("gpu", {"CPU": 8.0, "GPU": 1.0}, 2), ("cpu", {"CPU": 4.0}, UNLIMITED)]
    assert most_workers({"CPU": 2.0}, limits) == 10  # unlimited nodes, but the cluster's CPU cap is 20
    assert most_workers({"CPU": 1.0, "GPU": 1.0}, limits) == 2
    assert limits_from_cluster_config(autoscaler_pb2.ClusterConfig()) is None  # nothing reported: a fixed cluster


def test_most_workers_respects_the_total_node_cap() -> None:
    limits = AutoscalerLimits((NodeGroup("big", {"CPU": 4.0}, max_count=2), NodeGroup("small", {"CPU": 1.0},
                                                                                     max_count=10)), max_nodes=3)
    assert most_workers({"CPU": 1.0}, limits) == 9  # two 4-CPU nodes and one 1-CPU node
    assert most_workers({"CPU": 2.0}, limits) == 4  # the small type holds none


def test_a_job_larger_than_what_is_up_now_is_accepted_when_a_node_type_can_be_added() -> None:
    scaling = WorkersConfig(num_workers=[2, 3], cpus_per_worker=1)
    with pytest.raises(ResourceError, match=r"needs 2 CPUs .* has 0"):
        check_fixed_fit(scaling, HEAD_ONLY_NOW)  # what check_cluster did on every cluster
    check_autoscaling_fit(scaling, local_limits(max_nodes=2))  # the autoscaler adds the two nodes it needs


def test_a_worker_larger_than_every_node_type_fails_naming_the_resources() -> None:
    scaling = WorkersConfig(num_workers=1, cpus_per_worker=4)
    with pytest.raises(ResourceError) as caught:
        check_autoscaling_fit(scaling, local_limits(max_nodes=3, cpus_per_node=2))
    message = str(caught.value)
    assert "scaling.cpus_per_worker=4" in message and "one worker asks for CPU 4" in message
    assert "cpu2 (CPU 2; up to 3 nodes)" in message and "ray.head.default (CPU 0; up to 1 node)" in message
    with pytest.raises(ResourceError, match=r"one worker asks for CPU 1, GPU 1 but no node type .*cpu1 \(CPU 1;"):
        check_autoscaling_fit(WorkersConfig(num_workers=1, use_gpu=True), local_limits(max_nodes=3))


def test_more_minimum_workers_than_all_node_types_hold_fails_naming_the_most() -> None:
    limits = local_limits(max_nodes=2, cpus_per_node=2)
    check_autoscaling_fit(WorkersConfig(num_workers=[4, 8], cpus_per_worker=1), limits)  # min 4 fits 2 x 2 CPUs
    with pytest.raises(ResourceError, match=r"num_workers=\[5, 8\].*5 workers of CPU 1 each are needed at least, "
                                            r"but the autoscaler's node types hold at most 4 at once .*"
                                            r"at most 2 worker nodes in all"):
        check_autoscaling_fit(WorkersConfig(num_workers=[5, 8], cpus_per_worker=1), limits)


def test_fit_problem_is_none_only_when_some_type_holds_a_worker() -> None:
    limits = AutoscalerLimits((NodeGroup("none", {"CPU": 8.0}, max_count=0),))  # a type that may not be added
    assert fit_problem(worker_shape(1, False), fewest=1, limits=limits) is not None
    unlimited = AutoscalerLimits((NodeGroup("any", {"CPU": 2.0}, max_count=UNLIMITED),))
    assert fit_problem(worker_shape(2, False), fewest=1000, limits=unlimited) is None


def test_a_head_with_cpus_holds_workers_outside_the_worker_node_cap() -> None:
    config = autoscaling_config("127.0.0.1:1", min_nodes=0, max_nodes=1)
    config["available_node_types"]["ray.head.default"]["resources"] = {"CPU": 2}
    limits = limits_from_autoscaling_config(config)
    assert limits is not None and most_workers({"CPU": 1.0}, limits) == 3  # two on the head, one on the node


# A KubeRay head pod as `llmstack k8s render` leaves it: one CPU group kept at 1 pod of up to 4, one GPU group from 0.
KUBERAY_GROUPS = [{"group": "workers", "resources": {"CPU": 2}, "min": 1, "max": 4},
                  {"group": "gpu", "resources": {"CPU": 8, "GPU": 1}, "min": 0, "max": 2}]


def test_published_worker_groups_judge_a_job_by_what_the_autoscaler_can_add() -> None:
    limits = published_limits({NODE_GROUPS_ENV: json.dumps(KUBERAY_GROUPS)})
    assert limits is not None and limits.scales and limits.source == NODE_GROUPS_ENV
    assert [(t.name, dict(t.resources), t.min_count, t.max_count) for t in limits.node_types] == [
        ("workers", {"CPU": 2.0}, 1, 4), ("gpu", {"CPU": 8.0, "GPU": 1.0}, 0, 2)]
    grows = WorkersConfig(num_workers=[4, 8], cpus_per_worker=2)  # 4 x CPU 2 + 2 x (CPU 8: 4 each) = 12 at most
    with pytest.raises(ResourceError):
        check_fixed_fit(grows, {"CPU": 2.0})  # the one pod up at the start
    check_autoscaling_fit(grows, limits)
    check_autoscaling_fit(WorkersConfig(num_workers=2, use_gpu=True), limits)  # the GPU group starts from 0
    with pytest.raises(ResourceError) as caught:
        check_autoscaling_fit(WorkersConfig(num_workers=1, cpus_per_worker=16), limits)
    assert "one worker asks for CPU 16 but no node type" in str(caught.value)
    assert "workers (CPU 2; up to 4 nodes); gpu (CPU 8, GPU 1; up to 2 nodes)" in str(caught.value)
    with pytest.raises(ResourceError, match=r"13 workers of CPU 2 each .* hold at most 12 at once"):
        check_autoscaling_fit(WorkersConfig(num_workers=[13, 16], cpus_per_worker=2), limits)
    assert published_limits({}) is None and published_limits({NODE_GROUPS_ENV: " "}) is None
    assert published_limits({NODE_GROUPS_ENV: "[]"}) is None  # no worker group: a fixed head-only cluster


@pytest.mark.parametrize(("value", "expected"), [
    ("workers: 2", r"LLMSTACK_NODE_GROUPS: not JSON \(Expecting value"),
    ('{"group": "workers"}', r"LLMSTACK_NODE_GROUPS: must be a JSON list of worker groups, got dict"),
    ('["workers"]', r"LLMSTACK_NODE_GROUPS\[0\]: must be an object with group, resources, min and max"),
    ('[{"group": "w", "resources": {"CPU": 2}, "min": 0}]', r"LLMSTACK_NODE_GROUPS\[0\]: missing 'max'"),
    ('[{"group": "w", "resources": {"CPU": -2}, "min": 0, "max": 2}]',
     r"LLMSTACK_NODE_GROUPS\[0\]\.resources: must map resource names to amounts >= 0, got \{'CPU': -2\}"),
    ('[{"group": "w", "resources": {"CPU": 2}, "min": 0, "max": 2}, {"group": "", "resources": [], "min": true, '
     '"max": "4"}]', r"LLMSTACK_NODE_GROUPS\[1\]\.group: .*; LLMSTACK_NODE_GROUPS\[1\]\.resources: .*; "
                     r"LLMSTACK_NODE_GROUPS\[1\]\.min: must be a whole number of pods >= 0, got True; "
                     r"LLMSTACK_NODE_GROUPS\[1\]\.max: .*got '4'"),
    ('[{"group": "w", "resources": {"CPU": 2}, "min": 3, "max": 2}]',
     r"LLMSTACK_NODE_GROUPS\[0\]\.min: must be <= max \(2\), got 3"),
])
def test_a_malformed_published_value_fails_naming_the_variable(value: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected) as caught:
        published_limits({NODE_GROUPS_ENV: value})
    assert "environment variable LLMSTACK_NODE_GROUPS (written on the head pod by `llmstack k8s render`" \
        in str(caught.value)


def test_a_cluster_whose_autoscaler_reports_nothing_to_ray_is_read_from_the_published_groups(monkeypatch) -> None:
    """A KubeRay head: no cluster config in the GCS, no v1 monitor process; the rendered groups in the env."""
    import ray
    import ray._private.state

    class HeadContext:  # the connected driver's runtime context (a GCS no monitor on this machine serves)
        gcs_address = "127.0.0.1:1"

    monkeypatch.setattr(ray._private.state.state, "get_cluster_config", lambda: None)
    monkeypatch.setattr(ray, "get_runtime_context", HeadContext)
    monkeypatch.delenv(NODE_GROUPS_ENV, raising=False)
    assert capacity.read_autoscaler_limits() is None  # a fixed cluster, as before
    monkeypatch.setenv(NODE_GROUPS_ENV, json.dumps(KUBERAY_GROUPS))
    limits = capacity.read_autoscaler_limits()
    assert limits is not None and limits.source == NODE_GROUPS_ENV and limits.scales
    monkeypatch.setenv(NODE_GROUPS_ENV, "[{")
    with pytest.raises(ConfigError, match="LLMSTACK_NODE_GROUPS: not JSON"):
        capacity.read_autoscaler_limits()
