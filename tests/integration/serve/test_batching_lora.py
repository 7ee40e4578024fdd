"""Dynamic batching equivalence and multi-LoRA selection with response-cache isolation, over real HTTP."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests
from serve_helpers import auth, server_stats

pytestmark = pytest.mark.ray

PROMPTS = ["d", "The quick brown fox jumps over the lazy", "line 12: the value of x is", "import os",
           "Ray Serve batches requests to use the hardware well. line 3", "y", "def add(a, b):", "line 40:"]
MAX_TOKENS = [17, 3, 25, 9, 1, 30, 12, 6]


def complete(app: Any, body: dict) -> dict:
    r = requests.post(app.url + "/v1/completions", json=body, headers=auth(), timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_batched_greedy_equals_alone(main_app: Any) -> None:
    """Mixed prompt lengths and max_tokens in one batch give each request what it gets alone."""
    bodies = [{"model": "tiny-lm", "prompt": p, "max_tokens": n, "temperature": 0} for p, n in zip(PROMPTS, MAX_TOKENS)]
    # Greedy ignores the seed, but the response cache keys on it: distinct seeds force real decoding.
    alone = [complete(main_app, {**b, "seed": 1000 + i}) for i, b in enumerate(bodies)]
    before = server_stats("main")
    with ThreadPoolExecutor(len(bodies)) as pool:
        batched = list(pool.map(lambda ib: complete(main_app, {**ib[1], "seed": 2000 + ib[0]}), enumerate(bodies)))
    after = server_stats("main")
    for a, b, n in zip(alone, batched, MAX_TOKENS):
        assert b["choices"][0]["text"] == a["choices"][0]["text"]
        assert b["choices"][0]["finish_reason"] == a["choices"][0]["finish_reason"]
        counts = ("prompt_tokens", "completion_tokens", "total_tokens")  # cached_tokens differ: a's blocks are warm
        assert [b["usage"][k] for k in counts] == [a["usage"][k] for k in counts]
        assert b["usage"]["completion_tokens"] <= n
    assert after["max_batch_size"] >= 3  # they really were decoded together
    assert after["batches"] - before["batches"] < len(bodies)


def test_adapters_selected_by_model_field_with_isolated_cache(main_app: Any) -> None:
    body = {"prompt": "line 5: the value", "max_tokens": 10, "temperature": 0}
    texts = {m: complete(main_app, {**body, "model": m})["choices"][0]["text"]
             for m in ("tiny-lm", "tiny-lm-lora-0", "tiny-lm-lora-1", "local-lora")}
    assert len(set(texts.values())) == 4, texts  # each adapter changes the output: really selected
    before = server_stats("main")
    # Same prompt again, adapters in another order: served from the cache, each adapter its own entry.
    for model in ("local-lora", "tiny-lm-lora-1", "tiny-lm", "tiny-lm-lora-0"):
        assert complete(main_app, {**body, "model": model})["choices"][0]["text"] == texts[model]
    after = server_stats("main")
    assert after["cache_hits"] - before["cache_hits"] == 4
    assert len(after["loaded_adapters"]) <= 2  # LRU bound per replica
    assert after["adapter_unloads"] >= 1  # three adapters through an LRU of two


def test_mixed_adapters_concurrently(main_app: Any) -> None:
    """Concurrent requests for different adapters batch apart and each gets its own adapter's answer."""
    models = ["tiny-lm", "tiny-lm-lora-0", "tiny-lm-lora-1"] * 3
    body = {"prompt": "line 21:", "max_tokens": 8, "temperature": 0}
    expected = {m: complete(main_app, {**body, "model": m, "seed": 1})["choices"][0]["text"] for m in set(models)}
    with ThreadPoolExecutor(len(models)) as pool:
        got = list(pool.map(lambda im: complete(main_app, {**body, "model": im[1], "seed": 100 + im[0]}),
                            enumerate(models)))
    for model, result in zip(models, got):
        assert result["choices"][0]["text"] == expected[model]
