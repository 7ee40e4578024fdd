"""Fuzz the API with schemathesis against the app's own OpenAPI schema: no input may produce a 5xx."""

from __future__ import annotations

from typing import Any

import pytest
import requests
from serve_helpers import deploy_app

pytestmark = pytest.mark.ray

schemathesis = pytest.importorskip("schemathesis")
hypothesis = pytest.importorskip("hypothesis")


@pytest.fixture(scope="module")
def fuzz_app(serve_registry: dict, serve_port: int) -> Any:
    # Tiny generation budget so each fuzzed request is quick; every value above it must be a clean 400.
    app = deploy_app(serve_registry, serve_port, app_name="fuzz", route_prefix="/fuzz", max_tokens_limit=4,
                     default_max_tokens=4, max_n=2, max_batch_size=8, response_cache_size=0)
    yield app
    app.shutdown()


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_no_server_errors(fuzz_app: Any, mode: str) -> None:
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(fuzz_app.url + "/openapi.json")
    generation = GenerationMode.POSITIVE if mode == "positive" else GenerationMode.NEGATIVE
    seen: dict[int, int] = {}
    operations = [("/v1/completions", "POST"), ("/v1/chat/completions", "POST")]
    if mode == "positive":  # GET /v1/models takes no input, so there is nothing negative to send
        operations.append(("/v1/models", "GET"))
    for path, method in operations:
        operation = schema[path][method]

        @settings(max_examples=25, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=generation))
        def run(case: Any) -> None:
            response = case.call(base_url=fuzz_app.url, timeout=60)
            seen[response.status_code] = seen.get(response.status_code, 0) + 1
            assert response.status_code < 500, (case.body, response.status_code, response.text[:300])
            if response.status_code >= 400:
                error = response.json()["error"]
                assert set(error) == {"message", "type", "param", "code"}

        run()
    assert requests.get(fuzz_app.url + "/health", timeout=10).status_code == 200
    assert sum(seen.values()) >= 25
    if mode == "negative":
        assert any(400 <= code < 500 for code in seen)
