"""What a manifest cannot carry is refused, every problem at once, each named by its key path."""

from __future__ import annotations

import pytest

from llmstack.errors import ConfigError, LLMStackError
from llmstack.k8s import render_manifest


def _problems(render, *args, **kwargs) -> list[str]:
    with pytest.raises(ConfigError) as info:
        render(*args, **kwargs)
    assert isinstance(info.value, LLMStackError)
    return info.value.problems


def test_a_missing_image_is_refused(config_path):
    with pytest.raises(ConfigError, match=r"k8s\.image: no container image given; pass --image"):
        render_manifest("serve", config_path("tiny.yaml"), overrides=["registry=s3://b/r"])


def test_an_inline_api_key_is_refused_naming_its_key_path(render, config_path):
    problems = _problems(render, "serve", config_path("tiny.yaml"), "http.api_key=hunter2")
    assert problems == ["http.api_key: an inline API key cannot go into a manifest; put it in a Secret and pass "
                        "k8s.api_key_secret=NAME/KEY (the app reads it from the pod's environment)"]
    shipped_with_key = {"applications": [{"name": "llmstack", "route_prefix": "/", "import_path":
                                          "llmstack.serve:build_app", "args": {"http": {"api_key": "hunter2"}}}]}
    problems = _problems(render, "serve", shipped_with_key)
    assert [p.split(":")[0] for p in problems] == ["applications[0].args.http.api_key"]


def test_inline_object_store_credentials_are_refused(render, config_path):
    problems = _problems(render, "train", config_path("train.yaml"), "storage_options.secret=abc",
                         "data.storage_options.aws_secret_access_key=abc", "k8s.env.AWS_SECRET_ACCESS_KEY=abc")
    paths = sorted(p.split(":")[0] for p in problems)
    assert paths == ["data.storage_options.aws_secret_access_key", "k8s.env.AWS_SECRET_ACCESS_KEY",
                     "storage_options.secret"]
    assert all("Secret" in p for p in problems)


def test_gpu_counts_no_worker_group_provides_are_refused(render, config_path):
    train = config_path("train.yaml")
    (problem,) = _problems(render, "train", train, "scaling.use_gpu=true", "k8s.worker.gpus=0")
    assert problem.startswith("k8s.worker.gpus: scaling.use_gpu is true")
    (problem,) = _problems(render, "train", train, "scaling.use_gpu=true", "scaling.num_workers=4",
                           "k8s.worker.gpus=1", "k8s.worker.replicas=3")
    assert problem == ("k8s.worker.replicas: 3 pod(s) x 1 GPU(s) provide 3, but scaling.num_workers=4 needs 4")
    (problem,) = _problems(render, "train", train, "k8s.worker.gpus=2")
    assert problem.startswith("k8s.worker.gpus: 2 GPU(s) per pod, but scaling.use_gpu is false")
    (problem,) = _problems(render, "serve", config_path("tiny.yaml"), "k8s.worker.gpus=1")
    assert "the app's model replicas request none" in problem


def test_a_config_the_kind_cannot_express_is_refused(render, config_path):
    (problem,) = _problems(render, "train", config_path("tiny.yaml"))
    assert problem.startswith("applications: ") and "`llmstack k8s render serve`" in problem
    (problem,) = _problems(render, "serve", config_path("train.yaml"))
    assert problem.startswith("name, storage_path, storage_options, training, scaling: RayJob (train/finetune) "
                              "options; a RayService (serve)")
    (problem,) = _problems(render, "serve", config_path("canary.yaml"))
    assert problem.startswith("applications[0].import_path: expected llmstack.serve:build_app")
    (problem,) = _problems(render, "serve", config_path("tiny.yaml"), "k8s.job.ttl_seconds_after_finished=60")
    assert problem.startswith("k8s.job.ttl_seconds_after_finished: a RayJob (train/finetune) option")
    problems = _problems(render, "train", config_path("train.yaml"), "k8s.service.upgrade_strategy=None",
                         "k8s.api_key_secret=llm-api/key", "autoscaling.max_replicas=3")
    assert sorted(p.split(":")[0] for p in problems) == ["autoscaling", "k8s.api_key_secret",
                                                         "k8s.service.upgrade_strategy"]


def test_paths_the_pods_cannot_see_are_refused(render, config_path):
    problems = _problems(render, "finetune", config_path("finetune.yaml"), "storage_path=/tmp/runs",
                         "base=./my-model", "data.source=notes.txt")
    assert sorted(p.split(":")[0] for p in problems) == ["base", "data.source", "storage_path"]
    (problem,) = _problems(render, "serve", config_path("tiny.yaml"), "registry=null")
    assert problem.startswith("registry: the pods load the model from the registry")
    problems = _problems(render, "canary", config_path("canary.yaml"), "candidate=/models/tiny", "adapters=[~/lora]")
    assert sorted(p.split(":")[0] for p in problems) == ["adapters[0]", "candidate"]


def test_every_problem_is_reported_at_once(config_path):
    with pytest.raises(ConfigError) as info:
        render_manifest("serve", config_path("tiny.yaml"), namespace="Not_A_Namespace",
                        overrides=["engine.max_batch_size=0", "k8s.api_key_secret=nokey",
                                   "k8s.bogus=1"])
    paths = sorted(p.split(":")[0] for p in info.value.problems)
    assert paths == ["engine.max_batch_size", "k8s.api_key_secret", "k8s.bogus", "k8s.image", "k8s.namespace"]
    assert "in " in str(info.value) and "tiny.yaml" in str(info.value)


def test_an_unknown_kind_lists_the_known_ones(config_path):
    with pytest.raises(ConfigError, match="kind: unknown kind 'service'; known: train, finetune, serve, canary"):
        render_manifest("service", config_path("tiny.yaml"), image="x/y:1")


@pytest.mark.parametrize("override, expected", [
    ("k8s.worker.memory=lots", "k8s.worker.memory: must be a Kubernetes quantity such as 8Gi, got 'lots'"),
    ("k8s.worker.replicas=0", "k8s.worker.replicas: must be >= 1, got 0"),
    ("k8s.head.cpu=0", "k8s.head.cpu: must be > 0, got 0.0"),
    ("k8s.service.upgrade_strategy=Rolling", "k8s.service.upgrade_strategy: must be one of 'NewCluster', 'None'"),
])
def test_bad_pod_options_name_their_key(render, config_path, override, expected):
    (problem,) = _problems(render, "serve", config_path("tiny.yaml"), override)
    assert problem.startswith(expected)
