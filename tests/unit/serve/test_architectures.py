"""Greedy decoding through the engine equals transformers' ``generate``, token for token, for every architecture.

Each model is a tiny random-init one built from its config class and saved with a tokenizer, then loaded the
way serving loads it. LLaMA, Mistral and Gemma-3 get a tokenizer that adds BOS (as theirs do); the others the
plain one. Requests run as batches of different lengths, again with prefix-cache hits, and joining a running
batch; Gemma-3's sliding window is shorter than the prompts, so a wrong window shows.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from llmstack.serve._testing import ARCHITECTURES, SLIDING_WINDOW
from llmstack.serve.protocol import GenerationRequest, SamplingParams

ADDS_BOS = {"llama", "mistral", "gemma3"}
HEADER = "line 12: the value of x is 84 and y is 36. The quick brown fox jumps over the lazy dog. "
PROMPTS = [HEADER + "import os", "d", HEADER + "line 13: the value of", HEADER, "Ray Serve batches requests",
           HEADER + "def add(a, b):\n    return"]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def tokenizers() -> dict[bool, Any]:
    from llmstack.data import train_tokenizer
    from llmstack.serve._testing import DOCS, bos_tokenizer

    plain = train_tokenizer(DOCS, vocab_size=320)
    return {False: plain, True: bos_tokenizer(plain)}


@pytest.fixture(scope="module", params=ARCHITECTURES)
def saved(request: pytest.FixtureRequest, tokenizers: dict[bool, Any],
          tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """``(architecture, directory)`` of a saved tiny model and its tokenizer."""
    from llmstack.serve._testing import tiny_causal_lm

    architecture = request.param
    tokenizer = tokenizers[architecture in ADDS_BOS]
    directory = tmp_path_factory.mktemp(architecture)
    tiny_causal_lm(architecture, tokenizer, seed=1).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return architecture, directory


def generate_alone(directory: Path, prompt_ids: list[list[int]]) -> list[list[int]]:
    """transformers' own greedy decoding, one unpadded prompt at a time, up to its first EOS."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    eos = model.generation_config.eos_token_id
    outputs = []
    for ids in prompt_ids:
        tensor = torch.tensor([ids])
        out = model.generate(tensor, attention_mask=torch.ones_like(tensor), do_sample=False,
                             max_new_tokens=MAX_TOKENS)[0, len(ids):].tolist()
        outputs.append(out[:out.index(eos)] if eos in out else out)
    return outputs


def greedy(model: str, prompt: Any = None, messages: Any = None) -> GenerationRequest:
    return GenerationRequest(model=model, prompt=prompt, messages=messages,
                             sampling=SamplingParams(max_tokens=MAX_TOKENS, temperature=0))


def test_greedy_equals_generate(saved: tuple[str, Path]) -> None:
    from transformers import AutoTokenizer

    from llmstack.serve.engine import TransformersEngine

    architecture, model_dir = saved
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt_ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    assert all((ids[0] == tokenizer.bos_token_id) == (architecture in ADDS_BOS) for ids in prompt_ids)
    assert len(prompt_ids[0]) > 4 * SLIDING_WINDOW
    expected = generate_alone(model_dir, prompt_ids)

    engine = TransformersEngine.from_source(str(model_dir), cache_size=0, prefix_cache_mb=4, max_tokens_limit=64)
    try:
        requests = [greedy(engine.model_id, p) for p in PROMPTS]
        assert [engine.prepare(r).prompt_ids for r in requests] == prompt_ids  # tokenized as tokenizer(prompt)
        batched = asyncio.run(engine.generate_batch(requests))
        assert [r.choices[0].token_ids for r in batched] == expected
        reused = asyncio.run(engine.generate_batch(requests[::-1]))[::-1]  # hits of different lengths per row
        assert [r.choices[0].token_ids for r in reused] == expected
        assert all(r.prefix_cached_tokens for r in reused if r.prompt_tokens > 16)

        async def joining() -> list[Any]:  # later requests merge into a running batch
            first = asyncio.ensure_future(engine.generate(requests[0]))
            while engine.stats["generated_tokens"] < 3 * len(PROMPTS) + 2:
                await asyncio.sleep(0.001)
            rest = await asyncio.gather(*(engine.generate(r) for r in requests[1:]))
            return [await first, *rest]

        passes = engine.stats["forward_passes"]
        joined = asyncio.run(joining())
        assert [r.choices[0].token_ids for r in joined] == expected
        assert engine.stats["forward_passes"] - passes < sum(len(e) + 1 for e in expected)  # shared passes

        messages = [{"role": "user", "content": "What is the value of x?"}]
        chat_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
        assert engine.prepare(greedy(engine.model_id, messages=messages)).prompt_ids == chat_ids
        assert chat_ids.count(tokenizer.bos_token_id) == 1  # the template's BOS, never a second one
        chat = asyncio.run(engine.generate(greedy(engine.model_id, messages=messages)))
        assert chat.choices[0].token_ids == generate_alone(model_dir, [chat_ids])[0]
    finally:
        engine.shutdown()


def test_sliding_window_layers_keep_prefix_reuse_and_merging(saved: tuple[str, Path]) -> None:
    """Gemma-3's sliding layers no longer switch the prefix cache or batch merging off."""
    from llmstack.serve.engine import TransformersEngine
    from llmstack.serve.engine.kv import has_sliding_window, new_cache

    architecture, model_dir = saved
    engine = TransformersEngine.from_source(str(model_dir), cache_size=0, prefix_cache_mb=4)
    try:
        assert new_cache(engine.model.config) is not None and engine.prefix_cache is not None
        assert engine.contiguous_prefill == has_sliding_window(engine.model.config)
        assert engine.contiguous_prefill == (architecture == "gemma3")
    finally:
        engine.shutdown()
