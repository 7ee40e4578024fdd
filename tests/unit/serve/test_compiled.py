"""The compiled decode step (engine.compile): bucketed KV, same greedy tokens as eager, no recompilation while
sequences grow within a bucket, eager fallback on a compile failure, bucket configuration checks. No Ray."""

from __future__ import annotations

import asyncio
import copy
import logging
from typing import Any

import pytest

from llmstack.errors import ConfigError

COMPILE_LOG = "llmstack.serve.engine.compiled"


def make_engine(tiny: tuple[Any, Any], **kwargs: Any) -> Any:
    from llmstack.serve.engine import ServedModel, TransformersEngine

    model, tokenizer = tiny
    return TransformersEngine(ServedModel(copy.deepcopy(model), tokenizer, "tiny", "tiny@v1", "test::tiny@v1"),
                              cache_size=0, max_tokens_limit=200, **kwargs)


def greedy(engine: Any, prompts: list[str], max_tokens: int) -> list[list[int]]:
    from llmstack.serve.protocol import GenerationRequest, SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    results = asyncio.run(engine.generate_batch([GenerationRequest(model="tiny", prompt=p, sampling=params)
                                                  for p in prompts]))
    return [r.choices[0].token_ids for r in results]


PROMPTS = ["def add(a, b):", "hello there"]


@pytest.fixture(scope="module")
def eager(tiny: tuple[Any, Any]) -> Any:
    engine = make_engine(tiny)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def compiled(tiny: tuple[Any, Any]) -> Any:
    engine = make_engine(tiny, compile_decode=True, kv_buckets=[64, 256])
    yield engine
    engine.shutdown()


# ---------------------------------------------------------------- the bucketed KV layer (fast)

def test_bucketed_layer_allocates_bucket_sizes_zero_filled_and_keeps_tokens_when_growing() -> None:
    import torch

    from llmstack.serve.engine.kv import GrowingLayer

    layer = GrowingLayer((4, 8))
    first = torch.randn(2, 3, 3, 5)
    layer.update(first, first + 1)
    assert layer.capacity == 4
    assert torch.equal(layer.keys, first) and torch.count_nonzero(layer._k[:, :, 3:]) == 0
    nxt = torch.randn(2, 3, 2, 5)
    keys, values = layer.update(nxt, nxt + 1)
    assert layer.capacity == 8
    assert torch.equal(keys, torch.cat([first, nxt], dim=2)) and torch.equal(values, torch.cat([first, nxt], 2) + 1)
    layer.column = torch.tensor([5])  # a compiled step's write: at the index, the whole bucket returned
    one = torch.randn(2, 3, 1, 5)
    keys, _ = layer.update(one, one)
    assert keys.shape[2] == 8 and torch.equal(keys[:, :, 5:6], one) and layer.keys.shape[2] == 5
    layer.column = None
    layer.advance()
    assert torch.equal(layer.keys[:, :, 5:6], one)


# ---------------------------------------------------------------- configuration (fast)

def test_buckets_that_cannot_hold_the_max_length_are_a_config_error_naming_the_key(tiny: tuple[Any, Any]) -> None:
    with pytest.raises(ConfigError, match=r"engine\.kv_buckets: the largest bucket \(128\) cannot hold .* 256"):
        make_engine(tiny, compile_decode=True, kv_buckets=[64, 128])  # the tiny model's max length is 256


def test_bucket_lists_must_be_increasing_positive_ints() -> None:
    from llmstack.config import EngineConfig
    from llmstack.serve.engine.compiled import check_buckets, default_buckets

    assert EngineConfig(kv_buckets=[128, 512]).check() == []
    for bad, why in (([256, 128], "strictly increasing"), ([0, 128], "positive ints"), ([], "at least one"),
                     ([64, 64], "strictly increasing"), ([64.0, 128], "positive ints")):
        problems = EngineConfig(kv_buckets=bad).check()
        assert [key for key, _ in problems] == ["kv_buckets"] and why in problems[0][1]
        with pytest.raises(ConfigError, match=r"engine\.kv_buckets"):
            check_buckets(bad, 1)
    assert default_buckets(300) == (128, 256, 512) and default_buckets(128) == (128,)
    assert check_buckets(None, 1000) == (128, 256, 512, 1024)


def test_compile_off_by_default_and_stats_report_zero(eager: Any) -> None:
    stats = eager.replica_stats()
    assert (stats["compiles"], stats["compile_fallbacks"], stats["compile_seconds"]) == (0, 0, 0)
    assert eager.new_cache().layers[0].buckets == ()


# ---------------------------------------------------------------- compiled decoding (compiles: slow)

@pytest.mark.slow
def test_compiled_greedy_tokens_equal_eager_without_recompiling_within_a_bucket(eager: Any, compiled: Any) -> None:
    tokens = greedy(compiled, PROMPTS, 30)  # prompt + 30 tokens stay within the 64-token bucket
    assert tokens == greedy(eager, PROMPTS, 30)
    stats = compiled.replica_stats()
    assert stats["compiles"] == 1 and stats["compile_fallbacks"] == 0 and stats["compile_seconds"] > 0
    passes = stats["forward_passes"]
    greedy(compiled, ["another prompt of other length", "x"], 25)  # other lengths, same bucket and batch size
    stats = compiled.replica_stats()
    assert stats["forward_passes"] - passes == 25  # a prefill and 24 decode steps ...
    assert stats["compiles"] == 1  # ... none of which compiled again


@pytest.mark.slow
def test_compiled_tokens_equal_eager_across_a_bucket_boundary(eager: Any, compiled: Any) -> None:
    before = compiled.replica_stats()["compiles"]
    tokens = greedy(compiled, PROMPTS, 80)  # grows from the 64-token bucket into the 256 one
    assert tokens == greedy(eager, PROMPTS, 80)
    assert compiled.replica_stats()["compiles"] - before <= 1  # at most once for the new bucket
    assert compiled.replica_stats()["compile_fallbacks"] == 0


@pytest.mark.slow
def test_a_compile_failure_falls_back_to_eager_with_one_warning_and_a_metric(
        tiny: tuple[Any, Any], eager: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from llmstack.serve.engine.compiled import CompiledDecoder

    def broken_backend(self: Any, graph: Any, example_inputs: Any) -> Any:
        raise RuntimeError("inductor exploded")

    monkeypatch.setattr(CompiledDecoder, "_backend", broken_backend)
    engine = make_engine(tiny, compile_decode=True)
    try:
        with caplog.at_level(logging.WARNING, logger=COMPILE_LOG):
            first = greedy(engine, PROMPTS, 12)
            second = greedy(engine, PROMPTS[:1], 12)
        assert first == greedy(eager, PROMPTS, 12) and second == first[:1]
        warnings = [r for r in caplog.records if r.name == COMPILE_LOG]
        assert len(warnings) == 1 and "inductor exploded" in warnings[0].getMessage()
        stats = engine.replica_stats()
        assert stats["compile_fallbacks"] == 1 and stats["compiles"] == 0
    finally:
        engine.shutdown()


def test_an_engine_with_adapters_decodes_eagerly_with_one_warning(
        tiny: tuple[Any, Any], adapter_dirs: list[Any], eager: Any, caplog: pytest.LogCaptureFixture) -> None:
    from llmstack.serve.engine import AdapterSpec
    from llmstack.serve.engine.loading import dir_identity

    adapters = [AdapterSpec("lora-0", str(adapter_dirs[0]), dir_identity(adapter_dirs[0]))]
    with caplog.at_level(logging.WARNING, logger=COMPILE_LOG):
        engine = make_engine(tiny, compile_decode=True, adapters=adapters)
    try:
        assert greedy(engine, PROMPTS, 8) == greedy(eager, PROMPTS, 8)
        assert [r.name for r in caplog.records].count(COMPILE_LOG) == 1
        stats = engine.replica_stats()
        assert stats["compile_fallbacks"] == 1 and stats["compiles"] == 0
    finally:
        engine.shutdown()
