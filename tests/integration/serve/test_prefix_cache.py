"""Prefix caching over real HTTP on a real local Ray Serve: reuse gives the uncached answer, per adapter; adapters
(and an adapter reloaded after LRU eviction) never reuse each other's blocks; counters on /metrics."""

from __future__ import annotations

import json
import random
import re
import time
from typing import Any

import pytest
import requests
from serve_helpers import auth, server_stats

pytestmark = pytest.mark.ray

MODELS = ["tiny-lm", "tiny-lm-lora-0", "tiny-lm-lora-1", "local-lora"]


def complete(app: Any, body: dict, *, stream: bool = False) -> tuple[str, dict]:
    """The text and the usage of one completion (a stream asks for its usage chunk)."""
    extra = {"stream": True, "stream_options": {"include_usage": True}} if stream else {}
    r = requests.post(app.url + "/v1/completions", json={**body, **extra}, headers=auth(), timeout=120,
                      stream=stream)
    assert r.status_code == 200, r.text
    if not stream:
        return r.json()["choices"][0]["text"], r.json()["usage"]
    events = [json.loads(line[6:]) for line in r.iter_lines(decode_unicode=True)
              if line and line.startswith("data: ") and line != "data: [DONE]"]
    return "".join(e["choices"][0]["text"] for e in events if e["choices"]), events[-1]["usage"]


def hit_tokens_of(app: Any, body: dict, **kwargs: Any) -> tuple[str, int]:
    """The text of one request and how many prompt tokens it took from the prefix cache (one replica); the
    response's ``usage.prompt_tokens_details.cached_tokens`` must say the same."""
    before = server_stats("main")["prefix_hit_tokens"]
    text, usage = complete(app, body, **kwargs)
    hit = server_stats("main")["prefix_hit_tokens"] - before
    assert usage["prompt_tokens_details"] == {"cached_tokens": hit}, usage
    return text, hit


def test_prefix_reuse_equals_uncached_and_stays_per_adapter(main_app: Any) -> None:
    rng = random.Random(1313)
    prompt = [rng.randrange(3, 300) for _ in range(52)]  # three full blocks; seen by no other test
    # Greedy ignores the seed but the response cache keys on it: a new seed forces real decoding.
    body = {"prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    cold = {}
    for i, model in enumerate(MODELS):
        # Every model before this one has cached these very blocks: none of them may be reused here.
        cold[model], hit = hit_tokens_of(main_app, {**body, "model": model, "seed": 10 + i})
        assert hit == 0, model
    assert len(set(cold.values())) == len(MODELS)  # each adapter really changed the output
    for i, model in enumerate(["tiny-lm", "local-lora"]):  # still loaded: the LRU holds the last two adapters
        warm, hit = hit_tokens_of(main_app, {**body, "model": model, "seed": 20 + i}, stream=i == 1)
        assert hit == 48 and warm == cold[model], model
    # tiny-lm-lora-0 was evicted by the LRU of two adapters: reloaded, it starts from nothing.
    deadline = time.time() + 30
    while "tiny-lm-lora-0" in server_stats("main")["loaded_adapters"] and time.time() < deadline:
        time.sleep(0.2)
    assert "tiny-lm-lora-0" not in server_stats("main")["loaded_adapters"]
    again, hit = hit_tokens_of(main_app, {**body, "model": "tiny-lm-lora-0", "seed": 30})
    assert hit == 0 and again == cold["tiny-lm-lora-0"]
    metrics = requests.get(main_app.url + "/metrics", headers=auth(), timeout=10).text

    def counter(name: str, model: str) -> float:
        found = re.search(rf'^{name}_total{{model="{model}"}} (\S+)$', metrics, re.M)
        return float(found.group(1)) if found else 0.0

    assert counter("llmstack_prefix_cache_queries", "tiny-lm") >= 2
    assert counter("llmstack_prefix_cache_hits", "tiny-lm") >= 1
    assert counter("llmstack_prefix_cache_hit_tokens", "tiny-lm") >= 48
    assert counter("llmstack_prefix_cache_hit_tokens", "local-lora") >= 48  # streamed: counted on the SSE path
