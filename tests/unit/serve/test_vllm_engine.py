"""``engine.kind: vllm`` without vLLM: the import error says how to install it and which versions work, the config
names bad values by key path, and what vLLM cannot serve is refused up front, naming the format (no vLLM
needed: these run in the main suite; tests/vllm/ runs vLLM itself)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from llmstack.errors import ConfigError, LLMStackError, ModelLoadError
from llmstack.serve.engine import vllm as vllm_engine


def test_vllm_missing_is_one_line_saying_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now fails as if it were not installed
    with pytest.raises(vllm_engine.VllmUnavailableError) as failure:
        vllm_engine.import_vllm()
    message = str(failure.value)
    assert isinstance(failure.value, LLMStackError) and "\n" not in message
    assert "pip install 'llmstack[vllm]'" in message and "make vllm-env" in message
    assert "vllm 0.32" in message and "transformers >=5.16.1,<5.20" in message


def test_a_vllm_broken_by_version_drift_names_installed_and_tested_versions(monkeypatch: pytest.MonkeyPatch) -> None:
    broken = types.ModuleType("vllm")  # importable, but without the API (what a mismatched install looks like)
    monkeypatch.setitem(sys.modules, "vllm", broken)
    with pytest.raises(vllm_engine.VllmUnavailableError) as failure:
        vllm_engine.import_vllm()
    message = str(failure.value)
    assert "cannot import vLLM" in message and "installed here:" in message and "tested together:" in message
    import transformers

    assert f"transformers {transformers.__version__}" in message  # what is installed, next to what works


def test_the_replica_reports_a_missing_vllm_as_its_start_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    from llmstack.config import EngineConfig, ServeConfig
    from llmstack.serve.deployments.server import engine_class

    monkeypatch.setitem(sys.modules, "vllm", None)
    cls = engine_class("vllm")
    assert cls is vllm_engine.VllmEngine  # importable without vLLM: the error comes when it starts
    with pytest.raises(vllm_engine.VllmUnavailableError, match="not installed"):
        cls.from_config(ServeConfig(model="tiny-lm@v1", engine=EngineConfig(kind="vllm")))


def test_serve_engine_config_is_checked_with_its_key_path() -> None:
    from llmstack.config import ServeConfig, load_config

    assert load_config(ServeConfig, {}).engine.kind == "transformers"
    assert load_config(ServeConfig, {"engine": {"kind": "vllm"}}).engine.kind == "vllm"
    with pytest.raises(ConfigError) as failure:
        load_config(ServeConfig, {"engine": {"kind": "tgi", "vllm": {"dtype": "int4"}}})
    message = str(failure.value)
    assert "2 config problems" in message
    assert "engine.kind: must be one of 'transformers', 'vllm', got 'tgi'" in message
    assert "engine.vllm.dtype: must be one of" in message
    with pytest.raises(ConfigError, match=r"engine\.vllm\.kv_cache_gb: must be > 0, got 0"):
        load_config(ServeConfig, {"engine": {"kind": "vllm", "vllm": {"kv_cache_gb": 0}}})


def test_llmstack_quantized_artifacts_are_refused_naming_the_format(tmp_path: Path) -> None:
    from llmstack.models import describe_artifact

    directory = tmp_path / "tiny-lm-nf4"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (directory / "quantization.json").write_text(json.dumps({"method": "nf4"}))
    with pytest.raises(ModelLoadError) as failure:
        vllm_engine.check_servable(describe_artifact(directory))
    message = str(failure.value)
    assert "quantized by llmstack (nf4)" in message and "vLLM cannot load" in message
    assert "engine: transformers" in message


def test_adapters_other_than_plain_lora_are_refused(tuned_adapters: dict[str, Any], tmp_path: Path) -> None:
    from llmstack.models import describe_artifact

    registry = tuned_adapters["registry"]
    for method in ("bitfit", "qlora"):
        adapter = describe_artifact(str(tuned_adapters[method]["ref"]), registry=registry)
        with pytest.raises(ModelLoadError, match=f"is a {method} adapter; vLLM serves plain LoRA adapters only"):
            vllm_engine.lora_rank(adapter)
        with pytest.raises(ModelLoadError, match="serve .* as `model` and the adapter under `adapters`"):
            vllm_engine.check_servable(adapter)


def test_max_lora_rank_is_vllms_smallest_that_fits() -> None:
    assert vllm_engine.max_lora_rank([]) == 1
    assert vllm_engine.max_lora_rank([4, 8]) == 8
    assert vllm_engine.max_lora_rank([9]) == 16
    with pytest.raises(ModelLoadError, match="rank 600"):
        vllm_engine.max_lora_rank([600])


def test_import_llmstack_does_not_import_vllm() -> None:
    import subprocess

    code = "import llmstack, llmstack.serve.engine.vllm, sys; print('vllm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_readme_vllm_deploy_line_parses_as_written() -> None:
    """The README's `llmstack deploy --config ... engine=vllm ...` line: its file and overrides are a valid config."""
    import re
    import shlex

    from llmstack.config import ServeConfig, load_config

    repo = Path(__file__).parents[3]
    section = (repo / "README.md").read_text().split("## vLLM as an engine", 1)[1].split("\n## ", 1)[0]
    (line,) = [ln for ln in re.findall(r"^llmstack deploy .*$", section, flags=re.M)]
    argv = shlex.split(line, comments=True)
    config = argv[argv.index("--config") + 1]
    overrides = [arg for arg in argv[argv.index("--config") + 2:] if "=" in arg]
    cfg = load_config(ServeConfig, repo / config, overrides)
    assert cfg.engine.kind == "vllm" and cfg.engine.vllm.kv_cache_gb == 0.5


def test_num_gpus_reaches_the_model_replicas_actor_options() -> None:
    from llmstack.config import ServeConfig, load_config
    from llmstack.serve.deployments.builder import server_options

    assert "num_gpus" not in server_options(ServeConfig())["ray_actor_options"]
    cfg = load_config(ServeConfig, {"engine": {"kind": "vllm"}, "deployment": {"ray_actor_options": {"num_gpus": 1}}})
    assert server_options(cfg)["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1}
    with pytest.raises(ConfigError, match=r"deployment\.ray_actor_options\.num_gpus: must be a number >= 0, got -1"):
        load_config(ServeConfig, {"deployment": {"ray_actor_options": {"num_gpus": -1}}})


def test_a_gpu_vllm_serve_config_renders_gpu_worker_pods() -> None:
    from llmstack.k8s import render_manifest

    repo = Path(__file__).parents[3]
    manifest = render_manifest("serve", repo / "serve_configs" / "tiny.yaml", image="acme/llmstack:0.1",
                               overrides=["engine.kind=vllm", "deployment.ray_actor_options.num_gpus=1",
                                          "registry=s3://ml/registry"])
    text = manifest if isinstance(manifest, str) else json.dumps(manifest)
    assert "nvidia.com/gpu" in text


# --------------------------------------------------------------------------- sizing for the model (no vLLM)


def _llama_1b() -> Any:
    from transformers import LlamaConfig  # the shape of Llama-3.2-1B: 16 layers, 8 KV heads of 64, 128k positions

    return LlamaConfig(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                       head_dim=64, intermediate_size=8192, max_position_embeddings=131072)


def test_kv_bytes_per_token_is_layers_kv_heads_head_dim_k_and_v_dtype() -> None:
    from transformers import Gemma3TextConfig, GPT2Config

    assert vllm_engine.kv_bytes_per_token(_llama_1b(), "bfloat16") == 16 * 8 * 64 * 2 * 2
    assert vllm_engine.kv_bytes_per_token(_llama_1b(), "float32") == 16 * 8 * 64 * 2 * 4
    gpt2 = GPT2Config(n_layer=3, n_head=4, n_embd=64)  # no KV-head grouping: every head keeps K and V
    assert vllm_engine.kv_shape(gpt2) == (3, 4, 16)
    gemma = Gemma3TextConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                             hidden_size=64)
    assert vllm_engine.kv_bytes_per_token(gemma, "bfloat16") == 2 * 1 * 256 * 2 * 2  # head_dim as configured


def test_max_model_len_is_what_the_kv_cache_holds_within_the_positions() -> None:
    sizing = vllm_engine.size_engine(_llama_1b(), dtype="bfloat16", kv_cache_gb=0.5)
    # 0.5 GiB / 32 KiB per token = 16384 tokens, far below the 131072 positions: vLLM would refuse the latter
    assert (sizing.kv_bytes_per_token, sizing.cache_tokens, sizing.max_model_len) == (32768, 16384, 16384)
    roomy = vllm_engine.size_engine(_llama_1b(), dtype="bfloat16", kv_cache_gb=8)
    assert (roomy.cache_tokens, roomy.max_model_len, roomy.positions) == (262144, 131072, 131072)
    asked = vllm_engine.size_engine(_llama_1b(), dtype="bfloat16", kv_cache_gb=0.5, max_model_len=4096)
    assert asked.max_model_len == 4096
    fp32 = vllm_engine.size_engine(_llama_1b(), dtype="float32", kv_cache_gb=0.5)
    assert fp32.max_model_len == 8192  # twice the bytes per token, half the tokens


def test_a_sequence_the_cache_cannot_hold_is_refused_with_the_numbers() -> None:
    with pytest.raises(ModelLoadError) as failure:
        vllm_engine.size_engine(_llama_1b(), dtype="bfloat16", kv_cache_gb=0.5, max_model_len=131072, where="llama-1b")
    message = str(failure.value)
    assert "engine.vllm.max_model_len=131072 tokens of llama-1b" in message
    assert "16 layers x 8 KV heads x 64 head dim x 2 (K, V) x 2 bytes (bfloat16) = 32768 B/token" in message
    assert "holds 16384 tokens" in message and "raise engine.vllm.kv_cache_gb to >= 4.000" in message
    assert "lower engine.vllm.max_model_len to <= 16384" in message

    with pytest.raises(ModelLoadError, match=r"cannot hold one sequence of 513 tokens \(max_tokens_limit 512 \+ a "
                                             r"prompt\).*holds 448 tokens.*raise engine\.vllm\.kv_cache_gb to >= 0.016"):
        vllm_engine.size_engine(_llama_1b(), dtype="bfloat16", kv_cache_gb=0.014, max_tokens_limit=512)
    with pytest.raises(ModelLoadError, match="engine.vllm.max_model_len 200000 exceeds the 131072 positions"):
        vllm_engine.size_engine(_llama_1b(), dtype="bfloat16", kv_cache_gb=64, max_model_len=200000)
    with pytest.raises(ModelLoadError, match=r"needs 2.00 GiB of weights \+ 0.50 GiB of KV cache.*more than the "
                                             r"2.00 GiB this machine holds"):
        vllm_engine.size_engine(_llama_1b(), dtype="bfloat16", kv_cache_gb=0.5, memory_bytes=2 * 2**30,
                                weights_bytes=2 * 2**30)


def test_the_vllm_dtype_follows_the_model() -> None:
    assert vllm_engine.vllm_dtype("auto", "bfloat16", on_gpu=False) == "bfloat16"
    assert vllm_engine.vllm_dtype("auto", "float32", on_gpu=True) == "float32"  # not vLLM's auto (fp32 -> fp16)
    assert vllm_engine.vllm_dtype("auto", "float16", on_gpu=True) == "float16"
    assert vllm_engine.vllm_dtype("auto", "float16", on_gpu=False) == "bfloat16"
    assert vllm_engine.vllm_dtype("float32", "bfloat16", on_gpu=False) == "float32"  # asked: kept


def test_vllm_engine_kwargs_and_max_model_len_are_checked_with_their_key_paths() -> None:
    from llmstack.config import ServeConfig, load_config

    cfg = load_config(ServeConfig, {"engine": {"kind": "vllm",
                                               "vllm": {"engine_kwargs": {"block_size": 32, "swap_space": 1}}}})
    assert cfg.engine.vllm.engine_kwargs == {"block_size": 32, "swap_space": 1} and cfg.engine.vllm.dtype == "auto"
    with pytest.raises(ConfigError) as failure:
        load_config(ServeConfig, {"engine": {"vllm": {"engine_kwargs": {"dtype": "half", "max_num_seqs": 3},
                                                      "max_model_len": 0}}})
    message = str(failure.value)
    assert ("engine.vllm.engine_kwargs.dtype: llmstack sets it from engine.vllm.dtype; set that instead"
            in message)
    assert "engine.vllm.engine_kwargs.max_num_seqs: llmstack sets it from engine.max_batch_size" in message
    assert "engine.vllm.max_model_len: must be >= 1, got 0" in message


def test_from_source_hands_vllm_the_sized_arguments_and_the_kwargs_verbatim(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmstack.data import load_corpus, trained_tokenizer

    tokenizer = trained_tokenizer(load_corpus("builtin:stdlib", max_documents=20), vocab_size=300)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    tokenizer.save_pretrained(tmp_path / "bf16")
    seen: dict[str, Any] = {}

    class EngineArgs:
        def __init__(self, **kwargs: Any) -> None:
            seen.update(kwargs)

    class AsyncLLM:
        @staticmethod
        def from_engine_args(args: Any) -> Any:
            return types.SimpleNamespace()

    api = types.SimpleNamespace(AsyncEngineArgs=EngineArgs, AsyncLLM=AsyncLLM)
    monkeypatch.setattr(vllm_engine, "import_vllm", lambda: api)
    per_token = 2 * 2 * 8 * 2 * 2  # 2 layers x 2 KV heads x head dim 8 x (K, V) x bf16
    engine = vllm_engine.VllmEngine.from_source(str(tmp_path / "bf16"), kv_cache_gb=1000 * per_token / 2**30,
                                                engine_kwargs={"block_size": 32, "swap_space": 0}, on_gpu=False,
                                                max_tokens_limit=64)
    assert seen["dtype"] == "bfloat16"  # the model's own, not float32
    assert seen["max_model_len"] == engine.max_model_len == 992  # 1000 tokens of cache, in whole 32-token blocks
    assert (seen["block_size"], seen["swap_space"]) == (32, 0)
    with pytest.raises(ModelLoadError,
                       match=r"engine\.vllm\.engine_kwargs dtype: llmstack sets it from engine\.vllm\.dtype"):
        vllm_engine.VllmEngine.from_source(str(tmp_path / "bf16"), engine_kwargs={"dtype": "float16"})


# --------------------------------------------------------------------------- the Engine contract (a fake vLLM)


def test_the_vllm_engine_implements_the_engine_abc_with_the_shared_preparation(tiny: tuple[Any, Any]) -> None:
    """Driven by a stand-in ``AsyncLLM``: the same refusals as the transformers engine, the response cache, and
    no group batching (vLLM batches by itself, so the replica never calls run_batch)."""
    import asyncio

    from llmstack.errors import RequestError
    from llmstack.serve.engine import Engine
    from llmstack.serve.protocol import GenerationRequest, SamplingParams

    model, tokenizer = tiny
    answer = [5, 6, 7]

    class FakeLLM:
        async def generate(self, prompt: Any, params: Any, request_id: str, lora_request: Any = None) -> Any:
            for i, token in enumerate(answer):
                last = i == len(answer) - 1
                completion = types.SimpleNamespace(index=0, token_ids=[token], logprobs=None, stop_reason=None,
                                                   finish_reason="length" if last else None, text=f"<{token}>")
                yield types.SimpleNamespace(outputs=[completion], finished=last, num_cached_tokens=0)

    api = types.SimpleNamespace(SamplingParams=lambda **kw: types.SimpleNamespace(**kw),
                                TokensPrompt=lambda prompt_token_ids: prompt_token_ids,
                                RequestOutputKind=types.SimpleNamespace(DELTA="delta"))
    artifact = types.SimpleNamespace(name="tiny", ref="tiny@v1", directory=Path("/nowhere"), identity="tiny-id",
                                     source="tiny@production")
    engine = vllm_engine.VllmEngine(FakeLLM(), api, artifact=artifact, tokenizer=tokenizer, hf_config=model.config,
                                    eos_ids=frozenset({0}), max_tokens_limit=16)
    assert isinstance(engine, Engine) and not engine.group_batching

    def request(**sampling: Any) -> GenerationRequest:
        return GenerationRequest(model="tiny@production", prompt="line 3:", sampling=SamplingParams(**sampling))

    first = asyncio.run(engine.generate(request(max_tokens=3, temperature=0)))
    again = asyncio.run(engine.generate(request(max_tokens=3, temperature=0)))
    assert first.choices[0].token_ids == answer and first.choices[0].text == "<5><6><7>" and not first.cached
    assert again.cached and again.choices == first.choices
    assert engine.replica_stats()["requests"] == 1 and engine.replica_stats()["cache_hits"] == 1
    with pytest.raises(RequestError, match=r"logit_bias token ids must be in \[0, 320\)"):
        engine.prepare(request(logit_bias={9999: 1.0}))
    with pytest.raises(RequestError, match="max_tokens must be in"):
        engine.prepare(request(max_tokens=17))

    async def batch() -> None:
        async for _ in engine.run_batch([engine.prepare(request())]):
            pass

    with pytest.raises(RequestError, match="group_batching is False"):
        asyncio.run(batch())
    engine.executor.shutdown()


def test_deploy_refuses_an_unservable_version_before_any_replica_starts(tuned_adapters: dict[str, Any],
                                                                          tmp_path: Path) -> None:
    """resolve_config (the first thing deploy() does, no Ray) reads the version's manifest: an llmstack-quantized
    model or an adapter as `model` is refused there instead of after a replica started vLLM."""
    from llmstack.serve.deployments.builder import resolve_config

    registry = tuned_adapters["registry"]
    quantized = tmp_path / "tiny-lm-nf4"
    quantized.mkdir()
    (quantized / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (quantized / "quantization.json").write_text(json.dumps({"method": "nf4"}))
    ref = registry.register("tiny-lm-nf4", quantized, kind="quantized", extra={"quantization": {"method": "nf4"}})
    vllm = {"registry": registry.url, "engine": {"kind": "vllm"}}
    with pytest.raises(ModelLoadError, match=r"tiny-lm-nf4@v1 is quantized by llmstack \(nf4\).*engine: transformers"):
        resolve_config({**vllm, "model": "tiny-lm-nf4@latest"})
    adapter = str(tuned_adapters["bitfit"]["ref"])
    with pytest.raises(ModelLoadError, match="is a .*adapter; with engine.kind: vllm serve .* as `model`"):
        resolve_config({**vllm, "model": adapter})
    # The embedded engine serves both; vLLM still takes a float model.
    assert resolve_config({"registry": registry.url, "model": str(ref)}).model == str(ref)
    base = registry.manifest(tuned_adapters["bitfit"]["ref"]).parents[0]
    assert resolve_config({**vllm, "model": base}).model == base
