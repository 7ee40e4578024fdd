"""RayJobs on an autoscaling KubeRay cluster: the in-tree autoscaler for elastic runs, worker group bounds from
``scaling.num_workers: [min, max]``, the idle timeout, and a Kueue queue label; all valid against the CRD."""

from __future__ import annotations

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
