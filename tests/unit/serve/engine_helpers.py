"""Engine helpers shared by the unit tests here: an engine over a copy of the tiny model, greedy decoding."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

from llmstack.serve.engine import ServedModel, TransformersEngine
from llmstack.serve.protocol import GenerationRequest, SamplingParams


def greedy(engine: TransformersEngine, prompts: list[str], max_tokens: int = 16) -> list[list[int]]:
    """Each prompt's greedy tokens, the requests sent together (so they batch)."""
    async def all_of() -> list[Any]:
        return await asyncio.gather(*[engine.generate(GenerationRequest(
            model=engine.model_id, prompt=p, sampling=SamplingParams(max_tokens=max_tokens, temperature=0)))
            for p in prompts])

    return [r.choices[0].token_ids for r in asyncio.run(all_of())]


def served(tiny: tuple[Any, Any], **kwargs: Any) -> TransformersEngine:
    """An engine over a copy of ``tiny`` (model, tokenizer), response cache off."""
    model, tokenizer = tiny
    return TransformersEngine(ServedModel(copy.deepcopy(model), tokenizer, "tiny", "tiny@v1", "test::tiny@v1"),
                              cache_size=0, **kwargs)
