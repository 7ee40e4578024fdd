"""Manifests rendered from the shipped configs validate against KubeRay's CRD schemas and Ray's Serve schema."""

from __future__ import annotations

import copy
import shlex
from typing import Any

import pytest
import yaml

from llmstack.cli import build_parser
from llmstack.config import load_config, serve_app_args
from llmstack.k8s import manifest_yaml, write_manifest


def _cluster(manifest: dict[str, Any]) -> dict[str, Any]:
    spec = manifest["spec"]
    return spec.get("rayClusterSpec") or spec["rayClusterConfig"]


def _containers(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    cluster = _cluster(manifest)
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_every_shipped_config_renders_a_manifest_the_crd_schema_accepts(shipped, render, schema_errors):
    kind, path = shipped
    manifest = render(kind, path)
    assert manifest["kind"] == ("RayJob" if kind in ("train", "finetune") else "RayService")
    assert manifest["apiVersion"] == "ray.io/v1"
    assert schema_errors(manifest) == []
    assert all(c["image"] == "ghcr.io/acme/llmstack:0.1" for c in _containers(manifest))


@pytest.mark.parametrize("mutate, expected", [
    (lambda m: _cluster(m)["workerGroupSpecs"][0].update(replicas="two"), "'two' is not of type 'integer'"),
    (lambda m: m["spec"].update(shutdownAfterJobFinish=True), "'shutdownAfterJobFinish' was unexpected"),
    (lambda m: _cluster(m)["workerGroupSpecs"][0].pop("groupName"), "'groupName' is a required property"),
    (lambda m: _containers(m)[1]["resources"]["limits"].update(cpu="two cores"), "does not match"),
    (lambda m: m["spec"].update(runtimeEnvYAML={"env_vars": {}}), "is not of type 'string'"),
])
def test_a_mutated_rayjob_fails_the_schema(render, config_path, schema_errors, mutate, expected):
    manifest = render("train", config_path("train.yaml"))
    assert schema_errors(manifest) == []
    mutate(manifest)
    errors = schema_errors(manifest)
    assert any(expected in e for e in errors), errors


@pytest.mark.parametrize("mutate, expected", [
    (lambda m: m["spec"].update(serveConfigV2=yaml.safe_load(m["spec"]["serveConfigV2"])), "is not of type 'string'"),
    (lambda m: m["spec"]["upgradeStrategy"].update(kind="NewCluster"), "'kind' was unexpected"),
    (lambda m: m["spec"].pop("rayClusterConfig"), "'rayClusterConfig' is a required property"),
    (lambda m: _containers(m)[1]["readinessProbe"]["httpGet"].update(port=[8000]), "is not valid under any"),
])
def test_a_mutated_rayservice_fails_the_schema(render, config_path, schema_errors, mutate, expected):
    manifest = render("serve", config_path("tiny.yaml"))
    mutate(manifest)
    errors = schema_errors(manifest)
    assert any(expected in e for e in errors), errors


@pytest.mark.parametrize("name", ["tiny.yaml", "tiny-lora.yaml", "canary.yaml"])
def test_serve_config_v2_is_the_shipped_app_and_passes_rays_serve_schema(name, render, config_path,
                                                                         serve_config_errors):
    kind = "canary" if name == "canary.yaml" else "serve"
    manifest = render(kind, config_path(name))
    assert serve_config_errors(manifest) == []
    served = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    shipped = yaml.safe_load(config_path(name).read_text())
    (app,), (original,) = served["applications"], shipped["applications"]
    assert app["import_path"] == original["import_path"]  # no Secret asked for: llmstack's own builder
    assert (app["name"], app["route_prefix"]) == (original["name"], original["route_prefix"])
    assert app["args"] == {**original["args"], "registry": "s3://llmstack/registry"}
    assert served["http_options"] == {"host": "0.0.0.0", "port": shipped["http_options"]["port"]}
    # the app and `llmstack deploy --config` read the file through the same function
    builder = original["import_path"]
    args = serve_app_args(shipped, import_path=builder)
    http = {k: v for k, v in args.pop("http").items() if k not in ("route_prefix", "host", "port")}
    assert {**{k: v for k, v in args.items() if k != "app_name"}, **({"http": http} if http else {})} == \
        original["args"]


@pytest.mark.parametrize("mutate, expected", [
    (lambda c: c.update(proxy_location="Nowhere"), "proxy_location"),
    (lambda c: c["http_options"].update(port="eight thousand"), "http_options.port"),
    (lambda c: c["applications"][0].update(import_path="llmstack"), "applications.0.import_path"),
    (lambda c: c["applications"][0].update(args="model=tiny-lm"), "applications.0.args"),
    (lambda c: c["applications"].append(copy.deepcopy(c["applications"][0])), "applications"),
])
def test_a_mutated_serve_config_fails_rays_serve_schema(render, config_path, serve_config_errors, mutate, expected):
    manifest = render("serve", config_path("tiny.yaml"))
    serve_config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    mutate(serve_config)
    manifest["spec"]["serveConfigV2"] = yaml.safe_dump(serve_config)
    errors = serve_config_errors(manifest)
    assert any(e.startswith(expected) for e in errors), errors


@pytest.mark.parametrize("name", ["train.yaml", "finetune.yaml"])
def test_the_job_entrypoint_carries_the_same_config(name, render, config_path):
    from llmstack.config import FinetuneConfig, TrainConfig

    kind, cls = ("train", TrainConfig) if name == "train.yaml" else ("finetune", FinetuneConfig)
    manifest = render(kind, config_path(name))
    words = shlex.split(manifest["spec"]["entrypoint"])
    assert words[:2] == ["llmstack", kind]
    args = build_parser().parse_args(words[1:])  # the job runs exactly this command line
    assert args.config is None
    assert load_config(cls, None, args.overrides) == load_config(cls, config_path(name))


def test_the_job_has_its_ray_job_settings(render, config_path):
    spec = render("train", config_path("train.yaml"), "k8s.job.active_deadline_s=7200")["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["activeDeadlineSeconds"] == 7200
    assert yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]["TOKENIZERS_PARALLELISM"] == "false"


def test_worker_groups_follow_the_scaling_config(render, config_path):
    # train.yaml: 2 workers x 2 CPUs, no GPU -> two pods of 2 CPUs
    group = _cluster(render("train", config_path("train.yaml")))["workerGroupSpecs"][0]
    assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (2, 2, 2)
    resources = group["template"]["spec"]["containers"][0]["resources"]
    assert resources["requests"] == resources["limits"] == {"cpu": "2", "memory": "8Gi"}
    # 4 GPU workers on pods of 2 GPUs -> two pods, each with 2 GPUs and the CPUs of its 2 workers
    gpu = render("train", config_path("train.yaml"), "scaling.use_gpu=true", "scaling.num_workers=4",
                 "scaling.cpus_per_worker=1.5", "k8s.worker.gpus=2")
    group = _cluster(gpu)["workerGroupSpecs"][0]
    assert group["replicas"] == 2
    assert group["template"]["spec"]["containers"][0]["resources"]["limits"] == {
        "cpu": "3", "memory": "8Gi", "nvidia.com/gpu": 2}
    head = _cluster(gpu)["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # Ray schedules the training on the worker group
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]


def test_serving_pods_follow_the_app_autoscaling_and_route(render, config_path):
    manifest = render("serve", config_path("tiny.yaml"), "http.route_prefix=/llm", "http.port=8080",
                      "deployment.ray_actor_options.num_cpus=2",
                      "autoscaling.min_replicas=2", "autoscaling.max_replicas=4")
    spec = manifest["spec"]
    assert spec["upgradeStrategy"] == {"type": "NewCluster"}  # zero-downtime: a new cluster, then the switch
    cluster = _cluster(manifest)
    group = cluster["workerGroupSpecs"][0]
    # one 2-CPU replica fills a 2-CPU pod; the ingress (0.1 CPU) needs one more: 2 + 1 to 4 + 1 pods
    assert (group["minReplicas"], group["maxReplicas"]) == (3, 5)
    assert cluster["enableInTreeAutoscaling"] is True
    worker = group["template"]["spec"]["containers"][0]
    assert worker["ports"] == [{"name": "serve", "containerPort": 8080}]
    for probe in ("readinessProbe", "livenessProbe"):
        assert worker[probe]["httpGet"] == {"path": "/llm/health", "port": 8080}
    head_ports = {p["name"]: p["containerPort"] for p in cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}
    assert head_ports == {"gcs-server": 6379, "dashboard": 8265, "client": 10001, "serve": 8080}


def test_credentials_are_secret_references_only(render, config_path, schema_errors):
    manifest = render("serve", config_path("tiny.yaml"), "k8s.api_key_secret=llm-api/bearer",
                      "k8s.env.AWS_ENDPOINT_URL=http://minio.storage:9000")
    assert schema_errors(manifest) == []
    for container in _containers(manifest):
        env = {e["name"]: e for e in container["env"]}
        assert env["LLMSTACK_API_KEY"] == {"name": "LLMSTACK_API_KEY",
                                           "valueFrom": {"secretKeyRef": {"name": "llm-api", "key": "bearer"}}}
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert env[name]["valueFrom"] == {"secretKeyRef": {"name": "s3-creds", "key": name}}
            assert "value" not in env[name]
        assert env["AWS_ENDPOINT_URL"] == {"name": "AWS_ENDPOINT_URL", "value": "http://minio.storage:9000"}
    (app,) = yaml.safe_load(manifest["spec"]["serveConfigV2"])["applications"]
    assert app["import_path"] == "llmstack.k8s.builders:build_app"  # reads the key from the pod's environment
    assert app["args"]["http"]["api_key"] is None


def test_the_yaml_writer_round_trips_without_anchors(render, config_path, tmp_path):
    manifest = render("canary", config_path("canary.yaml"), "k8s.storage_secret=s3-creds")
    text = manifest_yaml(manifest)
    assert "&id" not in text and "*id" not in text
    assert "serveConfigV2: |" in text  # readable block, not an escaped one-liner
    path = write_manifest(manifest, tmp_path / "out" / "canary.yaml")
    assert yaml.safe_load(path.read_text()) == manifest
