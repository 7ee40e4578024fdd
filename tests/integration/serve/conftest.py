"""Serving fixtures: a tiny registered model with adapters, Serve on a free loopback port, the main app."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # serve_helpers, shared by the test modules here
from serve_helpers import API_KEY, deploy_app  # noqa: E402


@pytest.fixture(scope="session")
def serve_registry(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """tiny-lm@v1 (alias production), adapters tiny-lm-lora-0/1 in the registry, and one adapter on disk."""
    from llmstack.serve._testing import lora_adapter, make_registry

    root = tmp_path_factory.mktemp("serve")
    info = make_registry(str(root / "registry"), adapters=2)
    info["local_adapter"] = lora_adapter(info["torch_model"], root / "local-lora", seed=7)
    info["url"] = str(root / "registry")
    return info


@pytest.fixture(scope="session")
def serve_port(ray_cluster: dict) -> int:
    """Serve's HTTP port: a free loopback one when this module starts Serve, else the one it already holds
    (earlier test modules of the session may have started it; deploy() refuses any other port)."""
    from llmstack.serve._testing import serve_http_port

    return serve_http_port()


@pytest.fixture(scope="session")
def main_app(serve_registry: dict[str, Any], serve_port: int) -> Iterator[Any]:
    """Base model + two registry adapters + one local-directory adapter; API key on; an LRU of 2 adapters."""
    deployment = deploy_app(
        serve_registry, serve_port, app_name="main", route_prefix="/main", api_key=API_KEY,
        adapters=[*serve_registry["adapters"], f"local-lora={serve_registry['local_adapter']}"],
        max_adapters_per_replica=2, max_batch_size=8, batch_wait_timeout_s=0.05, max_ongoing_requests=32,
        max_body_bytes=20_000, response_cache_size=64, max_tokens_limit=200)
    yield deployment
    deployment.shutdown()
