"""quantize() artifacts through deploy(): the replica runs the quantized kernels and answers as the same
artifact does in-process (real Ray, real HTTP)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import requests
import torch
from serve_helpers import deploy_app, server_stats

pytestmark = pytest.mark.ray

PROMPT = "def add(a, b):"


# kernel: the module class (bitsandbytes swaps modules) or the weight's tensor type (torchao keeps nn.Linear)
@pytest.mark.parametrize("method,kernel", [("int8-weight-only", "Int8Tensor"), ("int4-weight-only", "Int4OpaqueTensor"),
                                           ("nf4", "Linear4bit")])
def test_a_quantized_artifact_serves_on_its_kernels(serve_registry: dict[str, Any], serve_port: int,
                                                    method: str, kernel: str) -> None:
    from llmstack.quantize import quantize
    from llmstack.serve.engine import TransformersEngine
    from llmstack.serve.protocol import GenerationRequest, SamplingParams

    registry = serve_registry["registry"]
    result = quantize({"evaluation": {"samples": 4, "speed_new_tokens": 4, "speed_repeats": 1},
                       "torchao": {"float_edge_layers": 0}},  # every decoder linear quantized
                      source=serve_registry["model"], method=method, registry=registry, name=f"tiny-lm-{method}")
    app = deploy_app(serve_registry, serve_port, model=str(result.ref), app_name=f"q-{method}",
                     route_prefix=f"/q-{method}", response_cache_size=0)
    try:
        body = {"model": str(result.ref), "prompt": PROMPT, "max_tokens": 12, "temperature": 0}
        served = requests.post(app.url + "/v1/completions", json=body, timeout=60)
        assert served.status_code == 200, served.text
        linears = server_stats(f"q-{method}")["linear_modules"]
        if not kernel.endswith("Tensor"):
            assert linears.get(kernel, 0) >= 4 * 7, linears  # every decoder linear of the 4 layers
    finally:
        app.shutdown()
    engine = TransformersEngine.from_source(str(result.ref), registry=registry)
    if kernel.endswith("Tensor"):  # torchao: nn.Linear modules whose weights are its tensors
        weights = [type(m.weight).__name__ for m in engine.model.modules() if isinstance(m, torch.nn.Linear)]
        assert weights.count(kernel) >= 4 * 7, weights
    try:
        alone = asyncio.run(engine.generate(GenerationRequest(
            model=engine.model_id, prompt=PROMPT, sampling=SamplingParams(max_tokens=12, temperature=0))))
    finally:
        engine.shutdown()
    assert served.json()["choices"][0]["text"] == alone.choices[0].text
