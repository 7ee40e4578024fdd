"""Config resolution and app assembly (no Ray cluster needed)."""

from __future__ import annotations

from typing import Any

import pytest

from llmstack.errors import ArtifactNotFoundError, ConfigError
from llmstack.serve.deployments.builder import build_app, resolve_config


@pytest.fixture(scope="module")
def small_registry(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from llmstack.serve._testing import make_registry

    return make_registry(str(tmp_path_factory.mktemp("reg") / "registry"), adapters=1)


def test_missing_model_says_to_run_the_quickstart(tmp_path: Any) -> None:
    with pytest.raises(ArtifactNotFoundError, match="make quickstart"):
        resolve_config({"model": "tiny-lm@production", "registry": str(tmp_path / "empty")})


def test_bad_config_lists_every_problem() -> None:
    with pytest.raises(ConfigError) as info:
        resolve_config({"engine": {"max_batch_size": 0}, "http": {"port": 70000},
                        "deployment": {"max_queued_requests": -5}})
    text = str(info.value)
    assert "engine.max_batch_size" in text and "http.port" in text and "deployment.max_queued_requests" in text
    with pytest.raises(ConfigError, match="autoscaling.max_replicas"):
        resolve_config({"autoscaling": {"min_replicas": 3, "max_replicas": 1}})


def test_aliases_and_adapters_are_pinned(small_registry: dict[str, Any]) -> None:
    url = small_registry["registry"].url
    cfg = resolve_config({"model": "tiny-lm@production", "registry": url, "adapters": ["tiny-lm-lora-0"]})
    assert cfg.model == "tiny-lm@v1" and cfg.model_aliases == ["tiny-lm@production"]
    assert cfg.adapters == ["tiny-lm-lora-0=tiny-lm-lora-0@v1"]
    with pytest.raises(ArtifactNotFoundError, match="adapter"):
        resolve_config({"model": "tiny-lm@production", "registry": url, "adapters": ["nope@v3"]})


def test_build_app_returns_an_application(small_registry: dict[str, Any]) -> None:
    from ray.serve import Application

    app = build_app({"model": "tiny-lm", "registry": small_registry["registry"].url,
                     "autoscaling": {"min_replicas": 1, "max_replicas": 3}})
    assert isinstance(app, Application)


def test_serves_a_quantized_artifact(small_registry: dict[str, Any]) -> None:
    """quantize() output (kind "quantized") loads through load_artifact and batches like a float model."""
    import asyncio

    from llmstack.quantize import quantize
    from llmstack.serve.engine import TransformersEngine
    from llmstack.serve.protocol import GenerationRequest, SamplingParams

    registry = small_registry["registry"]
    result = quantize({"evaluation": {"enabled": False}}, source="tiny-lm@v1", method="int8-dynamic", registry=registry,
                      name="tiny-lm-int8")
    ref = str(getattr(result, "ref", None) or "tiny-lm-int8")
    engine = TransformersEngine.from_source(ref, registry=registry, cache_size=0)
    assert registry.manifest(engine.root).kind == "quantized"
    requests = [GenerationRequest(model=engine.model_id, prompt=p, sampling=SamplingParams(max_tokens=n, temperature=0))
                for p, n in (("line 3:", 6), ("The quick brown fox", 9))]
    batched = asyncio.run(engine.generate_batch(requests))
    alone = [asyncio.run(engine.generate(r)) for r in requests]
    assert [b.choices[0].token_ids for b in batched] == [a.choices[0].token_ids for a in alone]
    engine.shutdown()


def test_adapter_from_an_fsspec_url(small_registry: dict[str, Any], tmp_path: Any) -> None:
    import asyncio

    import fsspec

    from llmstack.serve.engine import TransformersEngine
    from llmstack.serve.protocol import GenerationRequest, SamplingParams

    registry = small_registry["registry"]
    adapter_dir = registry.fetch("tiny-lm-lora-0")
    fs = fsspec.filesystem("memory")
    for path in adapter_dir.iterdir():
        fs.pipe(f"/adapters/lora0/{path.name}", path.read_bytes())
    engine = TransformersEngine.from_source("tiny-lm@v1", registry=registry, cache_size=0,
                                            adapters=["remote=memory://adapters/lora0", "tiny-lm-lora-0"])

    def text(model: str) -> list[int]:
        request = GenerationRequest(model=model, prompt="line 4:", sampling=SamplingParams(max_tokens=6, temperature=0))
        return asyncio.run(engine.generate(request)).choices[0].token_ids

    assert text("remote") == text("tiny-lm-lora-0") != text("tiny-lm")  # same weights, fetched over fsspec
    engine.shutdown()
