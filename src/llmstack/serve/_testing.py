"""A tiny registered model (and LoRA adapters) for serving tests, benchmarks and demos; seconds to build.

Random-initialised weights produce gibberish, but deterministic gibberish: exactly what batching
equivalence, adapter isolation and caching tests need.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

DOCS = [
    "def add(a, b):\n    \"\"\"Return the sum of a and b.\"\"\"\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog.",
    "Ray Serve batches requests to use the hardware well.",
    "import os\nprint(os.getcwd())\n",
] + [f"line {i}: the value of x is {i * 7} and y is {i * 3}." for i in range(60)]


def tiny_model(*, seed: int = 0, vocab_size: int = 320, max_seq_len: int = 256, preset: str = "tiny") -> tuple[Any, Any]:
    """A random-init preset model (``tiny`` by default) and a BPE tokenizer (with chat template) trained on a few lines."""
    from llmstack.data import train_tokenizer
    from llmstack.models import build_model

    tokenizer = train_tokenizer(DOCS, vocab_size=vocab_size)
    model = build_model(preset, vocab_size=len(tokenizer), max_seq_len=max_seq_len, seed=seed, tokenizer=tokenizer)
    return model.eval(), tokenizer


def lora_adapter(model: Any, directory: str | Path, *, seed: int, rank: int = 4) -> Path:
    """Save a LoRA adapter for ``model`` with random (non-identity) weights, so it changes the outputs."""
    import torch
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj", "o_proj"],
                        init_lora_weights=False, lora_dropout=0.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(_clone(model), config)
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.data.normal_(0.0, 0.5)
    peft_model.save_pretrained(str(directory), safe_serialization=True)
    return Path(directory)


def _clone(model: Any) -> Any:
    import copy

    return copy.deepcopy(model)


def make_registry(url: str, *, name: str = "tiny-lm", adapters: int = 2, alias: str = "production",
                  seed: int = 0, preset: str = "tiny") -> dict[str, Any]:
    """Register a tiny model (aliased ``name@alias``) and ``adapters`` LoRA adapters (``name-lora-i``).

    Returns:
        ``{"registry": Registry, "model": "name@v1", "adapters": ["name-lora-0@v1", ...], "tokenizer": tok}``
    """
    from llmstack.models import register_model
    from llmstack.registry import Registry

    registry = Registry(url)
    model, tokenizer = tiny_model(seed=seed, preset=preset)
    ref = register_model(registry, name, model, tokenizer, kind="model", metrics={"note": "random init"})
    registry.set_alias(name, alias, ref)
    refs = []
    for i in range(adapters):
        with tempfile.TemporaryDirectory() as tmp:
            lora_adapter(model, tmp, seed=100 + i)
            refs.append(str(registry.register(f"{name}-lora-{i}", tmp, kind="adapter", parents=[str(ref)])))
    return {"registry": registry, "model": str(ref), "adapters": refs, "tokenizer": tokenizer, "torch_model": model}


# One tiny random-init model per supported architecture, built from its transformers config class.
ARCHITECTURES = ("llama", "qwen2", "mistral", "gemma3", "phi3", "gpt2")
SLIDING_WINDOW = 6  # Gemma-3's sliding layers see this many tokens: shorter than the test prompts


def tiny_causal_lm(architecture: str, tokenizer: Any, *, seed: int = 0, max_positions: int = 256,
                   padded_vocab: bool = False) -> Any:
    """A 2-layer, hidden-64 random-init causal LM of ``architecture`` (one of :data:`ARCHITECTURES`).

    The vocabulary and special-token ids come from ``tokenizer``; ``padded_vocab`` makes the embedding
    matrix larger than the tokenizer (past the next multiple of 64), as released Qwen2 checkpoints are.
    Gemma-3 alternates a sliding-window layer (:data:`SLIDING_WINDOW` tokens) with a full-attention one;
    GPT-2 has learned positions, biases, LayerNorms and ``Conv1D`` projections; Phi-3 has fused
    ``qkv_proj`` and ``gate_up_proj``.
    """
    import torch
    import transformers

    vocab_size = (len(tokenizer) // 64 + 2) * 64 if padded_vocab else len(tokenizer)
    ids = {"vocab_size": vocab_size, "bos_token_id": tokenizer.bos_token_id,
           "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    shape = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "max_position_embeddings": max_positions, "tie_word_embeddings": False}
    if architecture == "llama":
        config, cls = transformers.LlamaConfig(**shape, **ids), transformers.LlamaForCausalLM
    elif architecture == "qwen2":
        config, cls = transformers.Qwen2Config(**shape, **ids), transformers.Qwen2ForCausalLM
    elif architecture == "mistral":
        config, cls = transformers.MistralConfig(**shape, **ids, sliding_window=None), transformers.MistralForCausalLM
    elif architecture == "gemma3":
        config = transformers.Gemma3TextConfig(**shape, **ids, head_dim=16, sliding_window=SLIDING_WINDOW,
                                               layer_types=["sliding_attention", "full_attention"])
        cls = transformers.Gemma3ForCausalLM
    elif architecture == "phi3":
        config, cls = transformers.Phi3Config(**shape, **ids), transformers.Phi3ForCausalLM
    elif architecture == "gpt2":
        config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=max_positions, **ids)
        cls = transformers.GPT2LMHeadModel
    else:
        raise ValueError(f"unknown architecture {architecture!r}; known: {', '.join(ARCHITECTURES)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


def bos_tokenizer(tokenizer: Any) -> Any:
    """A copy of ``tokenizer`` whose ``tokenizer(text)`` starts with its BOS token (as Gemma's and Llama's do)."""
    import copy

    from tokenizers import processors

    adding = copy.deepcopy(tokenizer)
    bos = adding.bos_token
    adding.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, adding.bos_token_id)])
    return adding


def serve_http_port(host: str = "127.0.0.1") -> int:
    """The HTTP port of this cluster's Serve, starting Serve on a free port of ``host`` when it is not running.

    A cluster has one Serve HTTP port and ``deploy()`` refuses any other, so tests and demos sharing a cluster
    ask for this one (call it with Ray initialised)."""
    from llmstack._ray import free_port, serve_http_address, start_serve
    from llmstack.errors import ResourceError

    running = serve_http_address()
    if running is None:  # Serve not started on this cluster yet (llmstack's proxy middleware comes with it)
        start_serve({"host": host, "port": free_port(host)})
        running = serve_http_address()
    if running is None:
        raise ResourceError(f"Serve was started on {host} but its controller reports no HTTP address; "
                            "check the Serve controller's log in the Ray session directory")
    return running[1]


def wait_healthy(url: str, timeout: float = 120, *, period: float = 0.3, process: Any = None,
                 log_path: str | Path | None = None) -> None:
    """Wait until ``url``/health answers 200 (tests, benchmarks, demos). A ``process`` that exits first fails at
    once; a failure quotes the end of ``log_path``.

    Raises:
        RuntimeError: ``process`` exited before the server was healthy.
        TimeoutError: not healthy within ``timeout`` seconds.
    """
    import time

    import requests

    def log_tail() -> str:
        return f"\n{Path(log_path).read_text(errors='replace')[-3000:]}" if log_path else ""

    deadline = time.time() + timeout
    while time.time() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{url}: the server exited with {process.returncode}" + log_tail())
        try:
            if requests.get(url + "/health", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(period)
    raise TimeoutError(f"{url} not healthy after {timeout} s" + log_tail())
