"""OpenAI parameters against the real engine in-process: honoured (max_completion_tokens, logprobs, penalties,
logit_bias), or refused with a 400 naming them — never dropped with a 200. Plus the smaller API gaps."""

from __future__ import annotations

import asyncio
import copy
import json
from typing import Any

import httpx
import pytest

from llmstack.serve.engine import ServedModel, TransformersEngine
from llmstack.serve.http import make_api


@pytest.fixture(scope="module")
def api(tiny: tuple[Any, Any]) -> Any:
    model, tokenizer = tiny
    engine = TransformersEngine(ServedModel(copy.deepcopy(model), tokenizer, "tiny", "tiny@v1", "test::tiny@v1"),
                                max_tokens_limit=64, cache_size=0, aliases=["tiny@production"])
    yield make_api(engine, {"engine": {"default_max_tokens": 24}})
    engine.shutdown()


def call(app: Any, *requests: tuple[str, str, dict[str, Any] | None]) -> list[httpx.Response]:
    async def main() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            return [await c.request(method, path, json=body) for method, path, body in requests]
    return asyncio.run(main())


def post(app: Any, path: str, body: dict[str, Any]) -> httpx.Response:
    return call(app, ("POST", path, body))[0]


CHAT = [{"role": "user", "content": "What does json.dumps do?"}]


def test_max_completion_tokens_limits_chat(api: Any) -> None:
    r = post(api, "/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": 3, "temperature": 0,
                                           "logit_bias": {}})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 3
    r = post(api, "/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": 2, "max_tokens": 20,
                                           "temperature": 0})
    assert r.json()["usage"]["completion_tokens"] <= 2  # the newer field wins, as in OpenAI's API


@pytest.mark.parametrize("field,value", [
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    ("tool_choice", "required"),
    ("response_format", {"type": "json_object"}),
    ("functions", [{"name": "f"}]),
    ("top_logprobs", 3),
    ("some_future_param", 1),
])
def test_chat_parameters_it_cannot_honour_are_a_400_naming_them(api: Any, field: str, value: Any) -> None:
    r = post(api, "/v1/chat/completions", {"messages": CHAT, field: value})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == field and error["code"] == "unsupported_parameter"


@pytest.mark.parametrize("field,value", [("suffix", "}"), ("best_of", 3)])
def test_completion_parameters_it_cannot_honour_are_a_400(api: Any, field: str, value: Any) -> None:
    r = post(api, "/v1/completions", {"prompt": "def add(a, b):", field: value})
    assert r.status_code == 400 and r.json()["error"]["param"] == field


@pytest.mark.parametrize("field,value", [("presence_penalty", 2.5), ("frequency_penalty", -3), ("logprobs", 9),
                                         ("logit_bias", {"1": 150}), ("logit_bias", {"nope": 1}),
                                         ("logit_bias", {"999999": 1})])
def test_out_of_range_parameters_are_a_400(api: Any, field: str, value: Any) -> None:
    r = post(api, "/v1/completions", {"prompt": "def add(a, b):", field: value})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field


def test_ignorable_fields_and_text_response_format_are_accepted(api: Any) -> None:
    r = post(api, "/v1/chat/completions", {"messages": CHAT, "user": "alice", "max_tokens": 2,
                                           "response_format": {"type": "text"}, "tool_choice": "none"})
    assert r.status_code == 200, r.text


def test_logit_bias_forces_a_token(api: Any, tiny: tuple[Any, Any]) -> None:
    token = tiny[1].encode("x", add_special_tokens=False)[0]
    r = post(api, "/v1/completions", {"prompt": "def add(a, b):", "max_tokens": 5, "temperature": 0,
                                      "logit_bias": {str(token): 100}})
    assert r.status_code == 200
    base = post(api, "/v1/completions", {"prompt": "def add(a, b):", "max_tokens": 5, "temperature": 0})
    assert r.json()["choices"][0]["text"] == tiny[1].decode([token] * 5)
    assert base.json()["choices"][0]["text"] != r.json()["choices"][0]["text"]


def test_penalties_stop_repetition(api: Any) -> None:
    body = {"prompt": "line 1: the value of x is", "max_tokens": 24, "temperature": 0}
    plain = post(api, "/v1/completions", body).json()["choices"][0]["text"]
    penalized = post(api, "/v1/completions", {**body, "frequency_penalty": 2.0, "presence_penalty": 2.0})
    assert penalized.status_code == 200

    def distinct_ratio(text: str) -> float:
        return len(set(text.split())) / max(1, len(text.split()))
    assert penalized.json()["choices"][0]["text"] != plain
    assert distinct_ratio(penalized.json()["choices"][0]["text"]) >= distinct_ratio(plain)


def test_completion_logprobs_match_the_text(api: Any) -> None:
    r = post(api, "/v1/completions", {"prompt": "def add(a, b):", "max_tokens": 6, "temperature": 0, "logprobs": 2})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert "".join(lp["tokens"]) == choice["text"]
    assert len(lp["token_logprobs"]) == len(lp["tokens"]) == len(lp["top_logprobs"]) == len(lp["text_offset"])
    for chosen, top in zip(lp["token_logprobs"], lp["top_logprobs"]):
        assert chosen <= 0 and 1 <= len(top) <= 2  # two byte-pieces may both print as U+FFFD: one key
        assert chosen >= max(top.values()) - 1e-5  # greedy: the chosen token is the most likely one
    assert lp["text_offset"][0] == 0


def test_chat_logprobs_streamed_and_not(api: Any) -> None:
    body = {"messages": CHAT, "max_tokens": 5, "temperature": 0, "logprobs": True, "top_logprobs": 1}
    r = post(api, "/v1/chat/completions", body)
    choice = r.json()["choices"][0]
    content = choice["logprobs"]["content"]
    assert "".join(t["token"] for t in content) == choice["message"]["content"]
    assert all(len(t["top_logprobs"]) == 1 and t["bytes"] == list(t["token"].encode()) for t in content)
    s = post(api, "/v1/chat/completions", {**body, "stream": True})
    events = [json.loads(line[6:]) for line in s.text.splitlines() if line.startswith("data: {")]
    assert not [e for e in events if "error" in e], s.text
    streamed = [t for e in events for c in e["choices"] if c.get("logprobs") for t in c["logprobs"]["content"]]
    assert [t["token"] for t in streamed] == [t["token"] for t in content]


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"prompt": "abc\ud800"}, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi \ud800"}]}, "messages[0].content"),
])
def test_lone_surrogates_are_a_400_naming_the_field(api: Any, path: str, body: dict[str, Any], param: str) -> None:
    async def main() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=api), base_url="http://test") as c:
            # json.dumps escapes the surrogate as \ud800: exactly what a client sends on the wire
            return await c.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"})
    r = asyncio.run(main())
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_models_retrieve_and_completion_usage_chunk(api: Any) -> None:
    one, alias, missing = call(api, ("GET", "/v1/models/tiny", None), ("GET", "/v1/models/tiny@production", None),
                               ("GET", "/v1/models/nope", None))
    assert one.status_code == 200 and one.json()["id"] == "tiny" and one.json()["object"] == "model"
    assert alias.status_code == 200 and alias.json()["id"] == "tiny"
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    r = post(api, "/v1/completions", {"prompt": "x", "max_tokens": 2, "stream": True,
                                      "stream_options": {"include_usage": True}})
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert events[-1]["usage"] and {e["object"] for e in events} == {"text_completion"}


def test_ignore_eos_and_min_tokens_give_exactly_the_tokens_asked(api: Any, tiny: tuple[Any, Any]) -> None:
    eos = tiny[1].eos_token_id
    body = {"prompt": "def add(a, b):", "max_tokens": 12, "temperature": 0, "logit_bias": {str(eos): 100}}
    assert post(api, "/v1/completions", body).json()["usage"]["completion_tokens"] == 1  # EOS forced first
    for extra in ({"ignore_eos": True}, {"min_tokens": 12}):
        r = post(api, "/v1/completions", {**body, **extra})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 12, r.text


@pytest.mark.parametrize("field,value", [("max_tokens", True), ("n", True), ("top_k", False), ("seed", 1.5),
                                         ("max_tokens", "4")])
def test_integer_parameters_take_json_integers_only(api: Any, field: str, value: Any) -> None:
    """``max_tokens: true`` was once read as 1."""
    r = post(api, "/v1/completions", {"prompt": "def add(a, b):", field: value})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field


@pytest.mark.parametrize("path,body", [("/v1/completions", {"prompt": "x", "max_tokens": 2}),
                                       ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 2})])
def test_a_lone_surrogate_in_stop_is_a_400(api: Any, path: str, body: dict[str, Any]) -> None:
    raw = json.dumps({**body, "stop": ["ok", "\ud800"]})  # json.dumps escapes it: the server decodes a lone surrogate
    async def main() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=api), base_url="http://test") as c:
            return await c.post(path, content=raw, headers={"Content-Type": "application/json"})
    r = asyncio.run(main())
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "stop"
