"""The engine contract: a replica (``LLMServer``) and its HTTP app run any :class:`Engine` subclass.

``UpperEngine`` is a test double written against the ABC alone (no model, no torch): it answers each
prompt with the prompt upper-cased, one character per token. The same replica tests run on it and on
the transformers engine, in-process (no Ray cluster): what passes for both is what the contract gives.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from llmstack.config import ServeConfig
from llmstack.errors import RequestError
from llmstack.serve.deployments.server import LLMServer, engine_class
from llmstack.serve.engine import Engine, RequestPreparer, Work
from llmstack.serve.http import make_api
from llmstack.serve.protocol import ChoiceDelta, GenerationChunk, Timing

ReplicaClass: Any = LLMServer.func_or_class  # the class under @serve.deployment, built without Ray


class CharTokenizer:
    """One token per character (its code point); a chat turn is ``role: content`` lines."""

    eos_token_id = 0
    pad_token_id = 0
    chat_template = "role: content"

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) for c in text]}

    def apply_chat_template(self, messages: list[dict[str, Any]], **_: Any) -> dict[str, list[int]]:
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
        return self(text)

    def decode(self, ids: list[int], **_: Any) -> str:
        return "".join(chr(i) for i in ids if i)


class UpperEngine(Engine):
    """Echoes the prompt upper-cased, a token per step; ``n`` choices are identical (it is deterministic)."""

    def __init__(self, cfg: ServeConfig) -> None:
        self.preparer = RequestPreparer(
            CharTokenizer(), model_id="upper", root="upper@v1", identity="upper@v1", aliases=cfg.model_aliases,
            vocab_size=256, max_model_len=128, default_max_tokens=cfg.engine.default_max_tokens,
            max_tokens_limit=cfg.engine.max_tokens_limit, max_n=cfg.engine.max_n,
            cache_size=cfg.engine.response_cache_size)
        self.executor = ThreadPoolExecutor(max_workers=1)
        self.stats = {"requests": 0, "cancelled": 0, "generated_tokens": 0}
        self._running: dict[str, Work] = {}

    @classmethod
    def from_config(cls, cfg: ServeConfig) -> UpperEngine:
        return cls(cfg)

    async def decode(self, work: Work) -> AsyncIterator[GenerationChunk]:
        request = work.request
        answer = [ord(chr(t).upper()) for t in work.prompt_ids][:work.max_tokens]
        reason = "length" if len(answer) == work.max_tokens else "stop"
        self.stats["requests"] += 1
        self._running[request.request_id] = work
        try:
            for step, token in enumerate(answer):
                await asyncio.sleep(0)  # a decode step: others (and abort) get the loop
                if work.cancelled:
                    return
                last = step == len(answer) - 1
                self.stats["generated_tokens"] += request.sampling.n
                chunk = GenerationChunk(request_id=request.request_id, model=request.model, deltas=[
                    ChoiceDelta(index=i, text=chr(token), token_ids=[token], finish_reason=reason if last else None)
                    for i in range(request.sampling.n)])
                if last:
                    work.reported = chunk.finished = True
                    chunk.prompt_tokens = len(work.prompt_ids)
                    chunk.completion_tokens = len(answer) * request.sampling.n
                    chunk.timing = Timing(total_s=0.0, batch_size=1)
                yield chunk
        finally:
            self._running.pop(request.request_id, None)
            if not work.reported:
                self.stats["cancelled"] += 1

    async def abort(self, request_id: str) -> bool:
        work = self._running.get(request_id)
        if work is not None:
            work.cancelled = True
        return work is not None

    async def check_health(self) -> None:
        return None

    async def acquire_adapter(self, adapter: str | None) -> None:
        assert adapter is None, "UpperEngine serves no adapters"

    def release_adapter(self, adapter: str | None) -> None:
        return None

    def unload_adapter(self, adapter: str) -> None:
        return None

    def loaded_adapters(self) -> list[str]:
        return []

    def replica_stats(self) -> dict[str, Any]:
        return {**self.stats, "loaded_adapters": [], "cache_hits": self.cache.hits, "cache_misses": self.cache.misses}

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False)


@pytest.fixture(scope="module")
def small_registry(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from llmstack.serve._testing import make_registry

    return make_registry(str(tmp_path_factory.mktemp("reg") / "registry"), adapters=0)


@pytest.fixture(params=["upper", "transformers"])
def replica(request: pytest.FixtureRequest, small_registry: dict[str, Any]) -> Iterator[Any]:
    """An ``LLMServer`` replica, built as Serve would (config dict, engine class), on each engine."""
    import torch

    threads = torch.get_num_threads()
    config = {"model": "tiny-lm@v1", "registry": small_registry["registry"].url,
              "engine": {"max_tokens_limit": 32, "response_cache_size": 8}}
    engine = UpperEngine if request.param == "upper" else None  # None: the config's engine (transformers)
    server = ReplicaClass(config, engine=engine)
    torch.set_num_threads(threads)  # the transformers engine sets the replica's compute threads
    if server.engine.group_batching:  # @serve.batch needs a live Serve replica: feed run_batch one work at a time
        async def one_at_a_time(work: Work) -> AsyncIterator[GenerationChunk]:
            async for outputs in server.engine.run_batch([work]):
                if isinstance(outputs[0], GenerationChunk):
                    yield outputs[0]

        server._batched = one_at_a_time  # noqa: SLF001
    yield server
    server.engine.shutdown()


def _post(app: Any, path: str, body: dict[str, Any]) -> httpx.Response:
    async def main() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post(path, json=body)

    return asyncio.run(main())


def test_the_replica_serves_completions_streams_and_chat_through_the_abc(replica: Any) -> None:
    app = make_api(replica, {})
    model = asyncio.run(replica.models())[0].id
    whole = _post(app, "/v1/completions", {"model": model, "prompt": "hello world", "max_tokens": 5,
                                           "temperature": 0})
    assert whole.status_code == 200, whole.text
    body = whole.json()
    assert body["usage"]["completion_tokens"] == 5 and body["choices"][0]["finish_reason"] == "length"
    streamed = _post(app, "/v1/completions", {"model": model, "prompt": "hello world", "max_tokens": 5,
                                              "temperature": 0, "stream": True})
    import json

    events = [json.loads(line[6:]) for line in streamed.text.splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    assert "".join(e["choices"][0]["text"] for e in events if e["choices"]) == body["choices"][0]["text"]
    chat = _post(app, "/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": "hi"}],
                                               "max_tokens": 4})
    assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["role"] == "assistant"
    if isinstance(replica.engine, UpperEngine):
        assert body["choices"][0]["text"] == "HELLO"
        assert chat.json()["choices"][0]["message"]["content"] == "USER"


def test_refusals_come_from_the_shared_preparation(replica: Any) -> None:
    app = make_api(replica, {})
    model = asyncio.run(replica.models())[0].id
    too_many = _post(app, "/v1/completions", {"model": model, "prompt": "x", "max_tokens": 33})
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "max_tokens"
    bias = _post(app, "/v1/completions", {"model": model, "prompt": "x", "logit_bias": {"100000": 1}})
    assert bias.status_code == 400 and bias.json()["error"]["param"] == "logit_bias"
    unknown = _post(app, "/v1/completions", {"model": "nope", "prompt": "x"})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"


def test_the_response_cache_and_stats_work_for_any_engine(replica: Any) -> None:
    app = make_api(replica, {})
    model = asyncio.run(replica.models())[0].id
    request = {"model": model, "prompt": "cache me", "max_tokens": 4, "temperature": 0}
    first, second = _post(app, "/v1/completions", request), _post(app, "/v1/completions", request)
    assert first.json()["choices"] == second.json()["choices"]
    stats = asyncio.run(replica.stats())
    assert stats["cache_hits"] == 1 and stats["cache_misses"] == 1 and stats["requests"] == 1
    assert stats["generated_tokens"] >= 1 and stats["loaded_adapters"] == []


def test_a_closed_stream_cancels_the_work_and_abort_knows_no_stranger(replica: Any) -> None:
    from llmstack.serve.protocol import GenerationRequest, SamplingParams

    async def main() -> None:
        model = (await replica.models())[0].id
        request = GenerationRequest(model=model, prompt="a longer prompt to echo",
                                    sampling=SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
        stream = replica.stream(request)
        first = await stream.__anext__()
        assert not first.finished
        await stream.aclose()
        for _ in range(500):  # the engine drops the work at its next step
            if (await replica.stats())["cancelled"]:
                break
            await asyncio.sleep(0.01)
        assert (await replica.stats())["cancelled"] == 1
        assert not await replica.abort("no-such-request")
        await replica.check_health()

    asyncio.run(main())


def test_a_replica_refuses_a_class_that_is_not_an_engine() -> None:
    class NotAnEngine:
        @classmethod
        def from_config(cls, cfg: ServeConfig) -> NotAnEngine:
            return cls()

    with pytest.raises(RequestError, match="not a subclass of llmstack.serve.engine.Engine"):
        engine_class(NotAnEngine)
    assert engine_class(UpperEngine) is UpperEngine
