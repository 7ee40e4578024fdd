"""`llmstack k8s render` on the command line, and the builders that read the API key from a pod's env."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
import yaml

from llmstack.cli import main
from llmstack.errors import ConfigError
from llmstack.k8s import builders


def test_render_writes_a_valid_manifest(config_path, schema_errors, tmp_path, capsys):
    out = tmp_path / "tiny-service.yaml"
    code = main(["k8s", "render", "serve", "--config", str(config_path("tiny.yaml")), "--image", "x/llmstack:1",
                 "--namespace", "ml", "registry=s3://llmstack/registry", "k8s.worker.cpu=4", "-o", str(out)])
    assert code == 0
    assert capsys.readouterr().out.startswith(f"wrote RayService llmstack to {out}")
    manifest = yaml.safe_load(out.read_text())
    assert manifest["metadata"]["namespace"] == "ml"
    assert schema_errors(manifest) == []


def test_render_prints_to_stdout_with_options_from_a_file(config_path, schema_errors, tmp_path, capsys):
    options = tmp_path / "k8s.yaml"
    options.write_text(yaml.safe_dump({"image": "x/llmstack:1", "storage_secret": "s3-creds",
                                       "worker": {"gpus": 1, "memory": "16Gi"}}))
    code = main(["--registry", "s3://llmstack/registry", "k8s", "render", "train",
                 "--config", str(config_path("train.yaml")), "--k8s-config", str(options), "scaling.use_gpu=true"])
    assert code == 0
    manifest = yaml.safe_load(capsys.readouterr().out)
    assert manifest["kind"] == "RayJob" and schema_errors(manifest) == []
    limits = manifest["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0][
        "resources"]["limits"]
    assert limits == {"cpu": "2", "memory": "16Gi", "nvidia.com/gpu": 1}


def test_a_user_mistake_is_one_line_and_non_zero(config_path, capsys):
    code = main(["k8s", "render", "serve", "--config", str(config_path("tiny.yaml")), "registry=s3://b/r"])
    err = capsys.readouterr().err
    assert code != 0 and err.count("\n") == 1
    assert "k8s.image: no container image given" in err
    with pytest.raises(SystemExit) as info:
        main(["k8s", "render", "service", "--image", "x/y:1"])
    assert info.value.code != 0
    assert "invalid choice: 'service'" in capsys.readouterr().err


def test_the_builders_read_the_key_from_the_environment(monkeypatch):
    monkeypatch.setenv(builders.API_KEY_ENV, "from-a-secret")
    assert builders.with_api_key({"model": "tiny-lm@v1", "http": {"api_key": None, "port": 8001}}) == {
        "model": "tiny-lm@v1", "http": {"api_key": "from-a-secret", "port": 8001}}
    monkeypatch.setenv(builders.API_KEY_ENV, "")
    with pytest.raises(ConfigError, match=r"api_key: \$LLMSTACK_API_KEY is empty in this pod"):
        builders.with_api_key({})


@pytest.mark.parametrize("import_path", [*builders.BUILDERS, *builders.BUILDERS.values()])
def test_every_import_path_a_manifest_names_resolves(import_path):
    module, _, name = import_path.partition(":")
    assert callable(getattr(importlib.import_module(module), name))


def test_importing_the_k8s_package_stays_light():
    code = "import sys, llmstack.k8s; print(sorted(m for m in ('ray', 'torch', 'jsonschema') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
