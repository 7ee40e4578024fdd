"""Config resolution and app assembly (no Ray cluster needed)."""

from __future__ import annotations

from typing import Any

import pytest

from llmstack.errors import ArtifactNotFoundError, ConfigError
from llmstack.serve.app import build_app, resolve_config


@pytest.fixture(scope="module")
def small_registry(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from llmstack.serve._testing import make_registry

    return make_registry(str(tmp_path_factory.mktemp("reg") / "registry"), adapters=1)


def test_missing_model_says_to_run_the_quickstart(tmp_path: Any) -> None:
    with pytest.raises(ArtifactNotFoundError, match="make quickstart"):
        resolve_config({"model": "tiny-lm@production", "registry": str(tmp_path / "empty")})


def test_bad_config_lists_every_problem() -> None:
    with pytest.raises(ConfigError) as info:
        resolve_config({"max_batch_size": 0, "port": 70000, "max_queued_requests": -5})
    text = str(info.value)
    assert "max_batch_size" in text and "port" in text and "max_queued_requests" in text
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
