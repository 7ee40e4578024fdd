"""``engine: vllm`` without vLLM: the import error says how to install it and which versions work, the config
names bad values by key path, and what vLLM cannot serve is refused up front, naming the format (no vLLM
needed: these run in the main suite; tests/vllm/ runs vLLM itself)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from llmstack.errors import ConfigError, LLMStackError, ModelLoadError
from llmstack.serve.engine import vllm as vllm_engine


def test_vllm_missing_is_one_line_saying_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now fails as if it were not installed
    with pytest.raises(vllm_engine.VllmUnavailableError) as failure:
        vllm_engine.import_vllm()
    message = str(failure.value)
    assert isinstance(failure.value, LLMStackError) and "\n" not in message
    assert "pip install 'llmstack[vllm]'" in message and "make vllm-env" in message
    assert "vllm 0.32" in message and "transformers >=5.16.1,<5.20" in message


def test_a_vllm_broken_by_version_drift_names_installed_and_tested_versions(monkeypatch: pytest.MonkeyPatch) -> None:
    broken = types.ModuleType("vllm")  # importable, but without the API (what a mismatched install looks like)
    monkeypatch.setitem(sys.modules, "vllm", broken)
    with pytest.raises(vllm_engine.VllmUnavailableError) as failure:
        vllm_engine.import_vllm()
    message = str(failure.value)
    assert "cannot import vLLM" in message and "installed here:" in message and "tested together:" in message
    import transformers

    assert f"transformers {transformers.__version__}" in message  # what is installed, next to what works


def test_the_replica_reports_a_missing_vllm_as_its_start_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    from llmstack.config import ServeConfig
    from llmstack.serve.deployments.server import engine_class

    monkeypatch.setitem(sys.modules, "vllm", None)
    cls = engine_class("vllm")
    assert cls is vllm_engine.VllmEngine  # importable without vLLM: the error comes when it starts
    with pytest.raises(vllm_engine.VllmUnavailableError, match="not installed"):
        cls.from_config(ServeConfig(model="tiny-lm@v1", engine="vllm"))


def test_serve_engine_config_is_checked_with_its_key_path() -> None:
    from llmstack.config import ServeConfig, load_config

    assert load_config(ServeConfig, {}).engine == "transformers"
    assert load_config(ServeConfig, {"engine": "vllm"}).engine == "vllm"
    with pytest.raises(ConfigError) as failure:
        load_config(ServeConfig, {"engine": "tgi", "vllm_dtype": "int4"})
    message = str(failure.value)
    assert "2 config problems" in message
    assert "engine: must be one of 'transformers', 'vllm', got 'tgi'" in message
    assert "vllm_dtype: must be one of" in message
    with pytest.raises(ConfigError, match="vllm_kv_cache_gb: must be > 0, got 0"):
        load_config(ServeConfig, {"engine": "vllm", "vllm_kv_cache_gb": 0})


def test_llmstack_quantized_artifacts_are_refused_naming_the_format(tmp_path: Path) -> None:
    from llmstack.models import describe_artifact

    directory = tmp_path / "tiny-lm-nf4"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (directory / "quantization.json").write_text(json.dumps({"method": "nf4"}))
    with pytest.raises(ModelLoadError) as failure:
        vllm_engine.check_servable(describe_artifact(directory))
    message = str(failure.value)
    assert "quantized by llmstack (nf4)" in message and "vLLM cannot load" in message
    assert "engine: transformers" in message


def test_adapters_other_than_plain_lora_are_refused(tuned_adapters: dict[str, Any], tmp_path: Path) -> None:
    from llmstack.models import describe_artifact

    registry = tuned_adapters["registry"]
    for method in ("bitfit", "qlora"):
        adapter = describe_artifact(str(tuned_adapters[method]["ref"]), registry=registry)
        with pytest.raises(ModelLoadError, match=f"is a {method} adapter; vLLM serves plain LoRA adapters only"):
            vllm_engine.lora_rank(adapter)
        with pytest.raises(ModelLoadError, match="serve .* as `model` and the adapter under `adapters`"):
            vllm_engine.check_servable(adapter)


def test_max_lora_rank_is_vllms_smallest_that_fits() -> None:
    assert vllm_engine.max_lora_rank([]) == 1
    assert vllm_engine.max_lora_rank([4, 8]) == 8
    assert vllm_engine.max_lora_rank([9]) == 16
    with pytest.raises(ModelLoadError, match="rank 600"):
        vllm_engine.max_lora_rank([600])


def test_import_llmstack_does_not_import_vllm() -> None:
    import subprocess

    code = "import llmstack, llmstack.serve.engine.vllm, sys; print('vllm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_readme_vllm_deploy_line_parses_as_written() -> None:
    """The README's `llmstack deploy --config ... engine=vllm ...` line: its file and overrides are a valid config."""
    import re
    import shlex

    from llmstack.config import ServeConfig, load_config

    repo = Path(__file__).parents[3]
    section = (repo / "README.md").read_text().split("## vLLM as an engine", 1)[1].split("\n## ", 1)[0]
    (line,) = [ln for ln in re.findall(r"^llmstack deploy .*$", section, flags=re.M)]
    argv = shlex.split(line, comments=True)
    config = argv[argv.index("--config") + 1]
    overrides = [arg for arg in argv[argv.index("--config") + 2:] if "=" in arg]
    cfg = load_config(ServeConfig, repo / config, overrides)
    assert cfg.engine == "vllm" and cfg.vllm_kv_cache_gb == 0.5


def test_num_gpus_reaches_the_model_replicas_actor_options() -> None:
    from llmstack.config import ServeConfig, load_config
    from llmstack.serve.deployments.builder import server_options

    assert "num_gpus" not in server_options(ServeConfig())["ray_actor_options"]
    cfg = load_config(ServeConfig, {"engine": "vllm", "num_gpus": 1})
    assert server_options(cfg)["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1}
    with pytest.raises(ConfigError, match="num_gpus: must be >= 0, got -1"):
        load_config(ServeConfig, {"num_gpus": -1})


def test_a_gpu_vllm_serve_config_renders_gpu_worker_pods() -> None:
    from llmstack.k8s import render_manifest

    repo = Path(__file__).parents[3]
    manifest = render_manifest("serve", repo / "serve_configs" / "tiny.yaml", image="acme/llmstack:0.1",
                               overrides=["engine=vllm", "num_gpus=1", "registry=s3://ml/registry"])
    text = manifest if isinstance(manifest, str) else json.dumps(manifest)
    assert "nvidia.com/gpu" in text
