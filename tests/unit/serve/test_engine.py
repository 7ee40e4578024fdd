"""The engine without HTTP or Ray: batched decoding equals decoding alone, sampling, stops, cache, adapters."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from llmstack.serve.engine import ResponseCache
from llmstack.serve.engine.output import safe_end
from llmstack.serve.engine.work import Row
from llmstack.serve.protocol import EngineError, GenerationRequest, SamplingParams

PROMPTS = ["d", "The quick brown fox jumps over the lazy", "line 12: the value of x is", "import os", "y",
           "Ray Serve batches requests to use the hardware well. line 3"]
MAX_TOKENS = [17, 3, 25, 9, 30, 1]


def req(prompt: Any, **sampling: Any) -> GenerationRequest:
    model = sampling.pop("model", "tiny")
    return GenerationRequest(model=model, prompt=prompt, sampling=SamplingParams(**sampling))


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_batched_greedy_equals_alone(engine: Any) -> None:
    requests = [req(p, max_tokens=n, temperature=0) for p, n in zip(PROMPTS, MAX_TOKENS)]
    batched = run(engine.generate_batch(requests))
    alone = [run(engine.generate(r)) for r in requests]
    for a, b, n in zip(alone, batched, MAX_TOKENS):
        assert b.choices[0].token_ids == a.choices[0].token_ids
        assert b.choices[0].text == a.choices[0].text
        assert b.completion_tokens == a.completion_tokens <= n
    assert batched[0].timing.batch_size == len(requests)
    assert engine.stats["max_batch_size"] == len(requests)


def test_seeded_sampling_is_reproducible_batched_or_alone(engine: Any) -> None:
    requests = [req(p, max_tokens=12, temperature=0.9, top_p=0.9, top_k=50, seed=7, n=2) for p in PROMPTS[:3]]
    batched = run(engine.generate_batch(requests))
    alone = [run(engine.generate(r)) for r in requests]
    for a, b in zip(alone, batched):
        assert [c.token_ids for c in a.choices] == [c.token_ids for c in b.choices]
    assert batched[0].choices[0].token_ids != batched[0].choices[1].token_ids  # n choices differ
    other = run(engine.generate(req(PROMPTS[0], max_tokens=12, temperature=0.9, top_p=0.9, top_k=50, seed=8)))
    assert other.choices[0].token_ids != alone[0].choices[0].token_ids


def test_stop_strings_truncate_and_stream_equals_whole(engine: Any) -> None:
    whole = run(engine.generate(req("line 3:", max_tokens=20, temperature=0)))
    text = whole.choices[0].text
    assert len(text) > 4
    stop = text[2:4]
    stopped = run(engine.generate(req("line 3:", max_tokens=20, temperature=0, stop=[stop])))
    assert stopped.choices[0].text == text[:text.find(stop)]
    assert stopped.choices[0].finish_reason == "stop"

    async def stream() -> list[str]:
        return [d.text async for c in engine.stream(req("line 3:", max_tokens=20, temperature=0, stop=[stop]))
                for d in c.deltas]
    pieces = run(stream())
    assert "".join(pieces) == stopped.choices[0].text  # the held-back stop prefix never leaks


def test_safe_end_holds_back_partial_characters_and_stop_prefixes() -> None:
    row = Row(work=0, choice=0, params=SamplingParams(stop=["END"]), generator=None, max_tokens=9, prompt_len=1)
    row.text = "abc EN"
    assert safe_end(row) == 4
    row.text = "abc \ufffd"
    assert safe_end(row) == 4
    row.text = "abc"
    assert safe_end(row) == 3


def test_closing_a_stream_cancels_the_generation(engine: Any) -> None:
    async def consume_two() -> None:
        stream = engine.stream(req("x", max_tokens=60, temperature=0.8))
        seen = 0
        async for _ in stream:
            seen += 1
            if seen == 2:
                break
        await stream.aclose()
    run(consume_two())
    assert engine.stats["generated_tokens"] < 60


def test_abort_stops_a_running_request(engine: Any) -> None:
    async def main() -> Any:
        request = req("x", max_tokens=60, temperature=0.8)
        task = asyncio.ensure_future(engine.generate(request))
        while request.request_id not in engine._works:
            await asyncio.sleep(0.001)
        assert await engine.abort(request.request_id)
        return await task
    result = run(main())
    assert result.completion_tokens < 60 and engine.stats["cancelled"] == 1
    assert not run(engine.abort("unknown"))


@pytest.mark.parametrize("sampling, param", [
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": 65}, "max_tokens"), ({"temperature": -1}, "temperature"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"n": 9}, "n"), ({"stop": list("abcde")}, "stop"),
])
def test_invalid_sampling(engine: Any, sampling: dict, param: str) -> None:
    with pytest.raises(EngineError) as info:
        engine.prepare(req("hi", **sampling))
    assert info.value.status_code == 400 and info.value.param == param


def test_context_window_errors_name_the_numbers(engine: Any) -> None:
    with pytest.raises(EngineError) as info:
        engine.prepare(req("line 3: the value " * 100))
    assert info.value.code == "context_length_exceeded" and "256" in info.value.message
    assert "prompt has" in info.value.message
    prompt_len = len(engine.prepare(req("line 3: the value " * 10)).prompt_ids)
    with pytest.raises(EngineError) as info:
        engine.prepare(req("line 3: the value " * 10, max_tokens=64 if prompt_len + 64 > 256 else 256 - prompt_len + 1))
    assert info.value.param == "max_tokens"
    assert engine.prepare(req("line 3: the value " * 10)).max_tokens == min(64, 256 - prompt_len)
    with pytest.raises(EngineError) as info:
        engine.prepare(req("hi", model="nope"))
    assert info.value.status_code == 404 and info.value.code == "model_not_found"


def test_chat_uses_the_tokenizer_template(engine: Any, tiny: Any) -> None:
    messages = [{"role": "user", "content": "hello"}]
    work = engine.prepare(GenerationRequest(model="tiny", messages=messages))
    expected = tiny[1].apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert work.prompt_ids == tiny[1](expected, add_special_tokens=False)["input_ids"]


def test_adapters_change_outputs_and_unload(engine: Any) -> None:
    outputs = {m: run(engine.generate(req("line 5:", model=m, max_tokens=8, temperature=0))).choices[0].token_ids
               for m in ("tiny", "lora-0", "lora-1")}
    assert len({tuple(v) for v in outputs.values()}) == 3
    # Base output is unchanged after adapters were loaded (adapters are disabled for the base).
    again = run(engine.generate(req("line 5:", model="tiny", max_tokens=8, temperature=0))).choices[0].token_ids
    assert again == outputs["tiny"]
    engine.unload_adapter("lora-0")
    assert engine.loaded_adapters() == ["lora-1"]
    reloaded = run(engine.generate(req("line 5:", model="lora-0", max_tokens=8, temperature=0))).choices[0].token_ids
    assert reloaded == outputs["lora-0"]


def test_response_cache_keys_on_model_and_adapter_identity(engine: Any) -> None:
    engine.cache = ResponseCache(16)
    first = run(engine.generate(req("line 7:", model="lora-0", max_tokens=6, temperature=0)))
    other = run(engine.generate(req("line 7:", model="lora-1", max_tokens=6, temperature=0)))
    assert not first.cached and not other.cached  # another adapter never reuses the entry
    hit = run(engine.generate(req("line 7:", model="lora-0", max_tokens=6, temperature=0)))
    assert hit.cached and hit.choices[0].token_ids == first.choices[0].token_ids
    sampled = run(engine.generate(req("line 7:", model="lora-0", max_tokens=6, temperature=0.7)))
    assert not sampled.cached  # unseeded sampling is never cached
    params = SamplingParams(temperature=0)
    assert ResponseCache.key("m@v1", None, [1], params, 4) != ResponseCache.key("m@v2", None, [1], params, 4)
    assert ResponseCache.key("m@v1", "a@v1", [1], params, 4) != ResponseCache.key("m@v1", "b@v1", [1], params, 4)


def test_requests_join_a_running_batch_and_still_match_alone(engine: Any) -> None:
    """Iteration-level batching: late arrivals merge into the running batch (KV caches padded and stacked)."""
    long_req = req("line 12: the value of x is", max_tokens=40, temperature=0)
    late = [req(p, max_tokens=n, temperature=0) for p, n in (("d", 12), ("The quick brown fox jumps over", 20),
                                                             ("import os", 5))]
    alone = [run(engine.generate(r)).choices[0].token_ids for r in [long_req, *late]]

    async def staggered() -> list[Any]:
        first = asyncio.ensure_future(engine.generate(long_req))
        while engine.stats["generated_tokens"] < sum(len(a) for a in alone) + 6:
            await asyncio.sleep(0.001)
        rest = await asyncio.gather(*(engine.generate(r) for r in late))
        return [await first, *rest]

    passes_before = engine.stats["forward_passes"]
    together = [r.choices[0].token_ids for r in run(staggered())]
    assert together == alone
    assert engine.stats["max_batch_size"] >= 2  # they shared forward passes with the long request
    # Fewer forward passes than decoding each on its own (40 + 12 + 20 + 5 steps).
    assert engine.stats["forward_passes"] - passes_before < 40 + 12 + 20 + 5


def test_max_batch_rows_caps_sequences_per_forward(engine: Any) -> None:
    engine.max_batch_rows = 3
    requests = [req(p, max_tokens=6, temperature=0) for p in PROMPTS]

    async def concurrently() -> list[Any]:
        return await asyncio.gather(*(engine.generate(r) for r in requests))
    results = run(concurrently())
    assert all(r.completion_tokens >= 1 for r in results)
    assert engine.stats["max_batch_size"] <= 3


def test_engine_leaves_the_callers_grad_mode_alone(engine: Any) -> None:
    import torch

    run(engine.generate(req("def f(x):", max_tokens=2, temperature=0)))
    assert torch.is_grad_enabled(), "building or running an engine must not switch autograd off for the caller"


def test_an_event_loop_closed_mid_slice_leaves_the_next_request_untouched(engine: Any) -> None:
    """Each asyncio.run (a notebook cell, a test) is a new loop; the old loop's half-run slice must not leak."""
    import time

    request = req("import os", max_tokens=20, temperature=0)
    expected = run(engine.generate(request)).choices[0].token_ids
    forward = engine.forward

    def slow_forward(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.02)  # a slice is still running on the engine thread when the loop goes away
        return forward(*args, **kwargs)

    async def abandon() -> None:
        asyncio.ensure_future(engine.generate(req("line 12: the value of x is", max_tokens=30, temperature=0)))
        await asyncio.sleep(0.1)  # leaving cancels the request and the scheduler's drive task mid-decode

    engine.forward = slow_forward
    run(abandon())
    engine.forward = forward
    for _ in range(3):
        assert run(engine.generate(request)).choices[0].token_ids == expected
