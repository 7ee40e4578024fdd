"""A model whose tokenizer adds BOS, served through deploy() over real HTTP, answers as transformers' generate.

The issue's case: a Gemma-family base answered wrongly over /v1/completions because prompts lost their BOS.
Here a tiny random-init Gemma-3 (sliding-window layers shorter than the prompt) with a BOS-adding tokenizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import requests
from serve_helpers import deploy_app

pytestmark = pytest.mark.ray

PROMPTS = ["The quick brown fox jumps over the lazy dog. line 12: the value of x is", "import os"]


@pytest.fixture(scope="module")
def bos_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from llmstack.data import train_tokenizer
    from llmstack.serve._testing import DOCS, bos_tokenizer, tiny_causal_lm

    tokenizer = bos_tokenizer(train_tokenizer(DOCS, vocab_size=320))
    directory = tmp_path_factory.mktemp("gemma3-bos")
    tiny_causal_lm("gemma3", tokenizer, seed=3).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_bos_model_over_http_equals_generate(serve_registry: dict[str, Any], serve_port: int,
                                             bos_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bos_model_dir)
    model = AutoModelForCausalLM.from_pretrained(bos_model_dir).eval()
    expected = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt")
        assert ids["input_ids"][0, 0] == tokenizer.bos_token_id
        out = model.generate(**ids, do_sample=False, max_new_tokens=12)[0, ids["input_ids"].shape[1]:].tolist()
        out = out[:out.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in out else out
        expected.append((len(ids["input_ids"][0]), tokenizer.decode(out, skip_special_tokens=True)))
    del model

    app = deploy_app(serve_registry, serve_port, model=str(bos_model_dir), app_name="bos", route_prefix="/bos",
                     response_cache_size=0)
    try:
        served_id = requests.get(app.url + "/v1/models", timeout=30).json()["data"][0]["id"]
        for prompt, (prompt_tokens, text) in zip(PROMPTS, expected):
            body = {"model": served_id, "prompt": prompt, "max_tokens": 12, "temperature": 0}
            response = requests.post(app.url + "/v1/completions", json=body, timeout=120)
            assert response.status_code == 200, response.text
            payload = response.json()
            assert payload["usage"]["prompt_tokens"] == prompt_tokens  # BOS counted: it was in the prompt
            assert payload["choices"][0]["text"] == text
    finally:
        app.shutdown()
