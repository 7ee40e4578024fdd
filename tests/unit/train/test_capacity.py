"""Whether a job fits an autoscaling cluster, judged by the node types its autoscaler can add (no Ray)."""

from __future__ import annotations

import pytest
from ray.core.generated import autoscaler_pb2

from llmstack.config import WorkersConfig
from llmstack.errors import ResourceError
from llmstack.train.capacity import (
    UNLIMITED,
    AutoscalerLimits,
    NodeGroup,
    fit_problem,
    limits_from_autoscaling_config,
    limits_from_cluster_config,
    most_workers,
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
