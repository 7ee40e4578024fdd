"""RayJobs on an autoscaling KubeRay cluster: the in-tree autoscaler for elastic runs, worker group bounds from
``scaling.num_workers: [min, max]``, the idle timeout, and a Kueue queue label; all valid against the CRD."""

from __future__ import annotations

import json
from typing import Any

import pytest

from llmstack.errors import ConfigError


def _spec(manifest: dict[str, Any]) -> dict[str, Any]:
    return manifest["spec"]["rayClusterSpec"]


def _bounds(manifest: dict[str, Any]) -> tuple[int, int, int]:
    group = _spec(manifest)["workerGroupSpecs"][0]
    return group["replicas"], group["minReplicas"], group["maxReplicas"]


def test_an_elastic_run_gets_the_in_tree_autoscaler_between_its_min_and_max(render, config_path, schema_errors):
    # train.yaml: 2 CPUs per worker, so one worker per pod of 2 CPUs
    manifest = render("train", config_path("train.yaml"), "scaling.num_workers=[1, 4]",
                      "k8s.autoscaling.idle_timeout_s=30", "k8s.autoscaling.upscaling_mode=Aggressive")
    assert schema_errors(manifest) == []
    assert _spec(manifest)["enableInTreeAutoscaling"] is True
    assert _spec(manifest)["autoscalerOptions"] == {"idleTimeoutSeconds": 30, "upscalingMode": "Aggressive"}
    assert _bounds(manifest) == (1, 1, 4)
    assert "kueue.x-k8s.io/queue-name" not in manifest["metadata"]["labels"]


def test_a_fixed_size_run_keeps_a_fixed_cluster_unless_asked(render, config_path, schema_errors):
    fixed = render("train", config_path("train.yaml"))
    assert "enableInTreeAutoscaling" not in _spec(fixed) and _bounds(fixed) == (2, 2, 2)
    asked = render("train", config_path("train.yaml"), "k8s.autoscaling.enabled=true",
                   "k8s.autoscaling.min_replicas=0", "k8s.autoscaling.max_replicas=3")
    assert schema_errors(asked) == []
    assert _spec(asked)["enableInTreeAutoscaling"] is True and _bounds(asked) == (0, 0, 3)
    off = render("train", config_path("train.yaml"), "scaling.num_workers=[1, 4]", "k8s.autoscaling.enabled=false")
    assert "enableInTreeAutoscaling" not in _spec(off) and _bounds(off) == (4, 4, 4)


def test_a_kueue_queue_labels_the_job_and_admits_a_fixed_size_cluster(render, config_path, schema_errors):
    manifest = render("finetune", config_path("finetune.yaml"), "scaling.num_workers=[1, 2]", "k8s.queue=team-a")
    assert schema_errors(manifest) == []
    assert manifest["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert "enableInTreeAutoscaling" not in _spec(manifest)  # Kueue admits the cluster at its max
    group = _spec(manifest)["workerGroupSpecs"][0]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"]


@pytest.mark.parametrize(("kind", "config", "overrides", "expected"), [
    ("train", "train.yaml", ["k8s.queue=team-a", "k8s.autoscaling.enabled=true"],
     "k8s.queue: Kueue admits a RayJob's cluster at a fixed size"),
    ("train", "train.yaml", ["k8s.queue=Team_A"], "k8s.queue: must name a Kueue LocalQueue"),
    ("train", "train.yaml", ["k8s.autoscaling.min_replicas=3", "k8s.autoscaling.max_replicas=2"],
     "k8s.autoscaling.min_replicas: must be <= max_replicas (2), got 3"),
    ("train", "train.yaml", ["k8s.autoscaling.idle_timeout_s=-1"], "k8s.autoscaling.idle_timeout_s: must be >= 0"),
    ("train", "train.yaml", ["scaling.num_workers=[2, 4]", "k8s.autoscaling.max_replicas=1"],
     "k8s.autoscaling.max_replicas: 1 pod(s) x 1 worker slot(s) can never hold the 2 worker(s)"),
    ("serve", "tiny.yaml", ["k8s.queue=team-a"], "k8s.queue: a RayJob (train/finetune) option"),
    ("serve", "tiny.yaml", ["k8s.autoscaling.idle_timeout_s=5"], "k8s.autoscaling.idle_timeout_s: a RayJob"),
])
def test_bad_autoscaling_options_name_their_key(render, config_path, kind, config, overrides, expected) -> None:
    with pytest.raises(ConfigError) as caught:
        render(kind, config_path(config), *overrides)
    assert expected in str(caught.value)


def _published(manifest: dict[str, Any]) -> str:
    """The value of the head container's node-groups variable, looked up by the name the capacity check reads."""
    from llmstack.train.capacity import NODE_GROUPS_ENV

    spec = manifest["spec"].get("rayClusterSpec") or manifest["spec"]["rayClusterConfig"]
    env = spec["headGroupSpec"]["template"]["spec"]["containers"][0].get("env", [])
    values = [item["value"] for item in env if item["name"] == NODE_GROUPS_ENV]
    assert len(values) == 1, f"{NODE_GROUPS_ENV} is set {len(values)} times on the head container"
    return values[0]


@pytest.mark.parametrize(("kind", "config", "overrides", "resources", "autoscaled"), [
    ("train", "train.yaml", ["scaling.num_workers=[1, 4]"], {"CPU": 2}, True),  # cpu limit "2"
    ("train", "train.yaml", [], {"CPU": 2}, False),  # fixed: exactly its replicas
    ("train", "train.yaml", ["scaling.num_workers=[1, 3]", "scaling.cpus_per_worker=1.5"], {"CPU": 2}, True),  # 1500m
    ("finetune", "finetune.yaml", ["scaling.num_workers=[2, 8]", "scaling.use_gpu=true", "k8s.worker.gpus=2"],
     {"CPU": 2, "GPU": 2}, True),
    ("serve", "tiny.yaml", ["autoscaling.max_replicas=6"], {"CPU": 2}, True),
    ("serve", "tiny.yaml", [], {"CPU": 2}, False),
])
def test_the_head_publishes_the_manifests_own_worker_groups(render, config_path, schema_errors, kind, config,
                                                            overrides, resources, autoscaled):
    manifest = render(kind, config_path(config), *overrides, "k8s.env.AWS_ENDPOINT_URL=http://minio:9000")
    assert schema_errors(manifest) == []
    spec = manifest["spec"].get("rayClusterSpec") or manifest["spec"]["rayClusterConfig"]
    assert spec.get("enableInTreeAutoscaling", False) is autoscaled
    (group,) = spec["workerGroupSpecs"]
    low, high = (group["minReplicas"], group["maxReplicas"]) if autoscaled else (group["replicas"],) * 2
    assert json.loads(_published(manifest)) == [
        {"group": group["groupName"], "resources": resources, "min": low, "max": high}]
    if autoscaled:
        assert low < high  # the groups the autoscaler may grow, not what starts
    head_env = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "AWS_ENDPOINT_URL", "value": "http://minio:9000"} in head_env  # the pod env is kept
    assert all(item["name"] != "LLMSTACK_NODE_GROUPS" for item in group["template"]["spec"]["containers"][0]["env"])


def test_the_capacity_check_judges_a_rendered_cluster_by_what_its_autoscaler_can_add(render, config_path):
    from llmstack.config import WorkersConfig
    from llmstack.errors import ResourceError
    from llmstack.train.capacity import limits_from_published_groups
    from llmstack.train.driver import check_autoscaling_fit, check_fixed_fit

    # train.yaml: 2 CPUs per worker; one pod kept, up to four
    limits = limits_from_published_groups(_published(render("train", config_path("train.yaml"),
                                                            "scaling.num_workers=[1, 4]")))
    assert limits is not None and limits.scales
    grows = WorkersConfig(num_workers=[3, 4], cpus_per_worker=2)
    with pytest.raises(ResourceError):
        check_fixed_fit(grows, {"CPU": 2.0})  # what the one pod up at the start holds
    check_autoscaling_fit(grows, limits)  # three pods are added for it
    with pytest.raises(ResourceError, match=r"one worker asks for CPU 4 but no node type .*workers \(CPU 2; up to 4"):
        check_autoscaling_fit(WorkersConfig(num_workers=1, cpus_per_worker=4), limits)
    with pytest.raises(ResourceError, match=r"5 workers of CPU 2 each .* hold at most 4 .*workers \(CPU 2; up to 4"):
        check_autoscaling_fit(WorkersConfig(num_workers=[5, 8], cpus_per_worker=2), limits)
