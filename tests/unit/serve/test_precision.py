"""engine.dtype: bf16 serving chooses the tokens fp32 serving does, logits and sampling stay fp32, auto follows
the stored dtype, and a dtype the CPU lacks the instructions for is refused (CPU flags faked)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from llmstack.config import ServeConfig, load_config
from llmstack.errors import ConfigError, ModelLoadError
from llmstack.serve.engine import TransformersEngine, precision
from llmstack.serve.protocol import GenerationRequest, SamplingParams

AVX2_ONLY = frozenset({"fpu", "sse4_2", "avx", "avx2", "fma", "f16c"})
AVX512_CORE = AVX2_ONLY | {"avx512f", "avx512bw", "avx512vl", "avx512dq"}
PROMPTS = ["d", "The quick brown fox jumps over the lazy", "line 12: the value of x is", "import os", "y",
           "Ray Serve batches requests to use the hardware well. line 3", "def main():", "for i in range(10):"]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def model_dir(tiny: tuple[Any, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model saved in float32, as a served directory."""
    from llmstack.models import save_model

    return save_model(*tiny, tmp_path_factory.mktemp("fp32-model"))


def _requests(engine: TransformersEngine) -> list[GenerationRequest]:
    sampling = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    return [GenerationRequest(model=engine.model_id, prompt=p, sampling=sampling) for p in PROMPTS]


def _greedy(engine: TransformersEngine) -> list[list[int]]:
    return [r.choices[0].token_ids for r in asyncio.run(engine.generate_batch(_requests(engine)))]


def _fp32_choices(model: Any, prompt_ids: list[int], generated: list[int]) -> list[int]:
    """The fp32 model's greedy choice at each step of ``generated``, given the same prefix (teacher forcing)."""
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([prompt_ids + generated])).logits[0]  # [T, V]
    return logits[len(prompt_ids) - 1:-1].argmax(dim=-1).tolist()


def _weights_dtype(engine: TransformersEngine) -> torch.dtype:
    return next(engine.model.parameters()).dtype


def test_bf16_greedy_equals_fp32_with_fp32_logits_and_sampling(model_dir: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from llmstack.serve.engine import batch

    fp32 = TransformersEngine.from_source(str(model_dir), dtype="float32", cache_size=0)
    bf16 = TransformersEngine.from_source(str(model_dir), dtype="bfloat16", cache_size=0)
    try:
        assert _weights_dtype(fp32) == torch.float32 and _weights_dtype(bf16) == torch.bfloat16
        sampled_dtypes: set[torch.dtype] = set()
        model_dtypes: set[torch.dtype] = set()
        sample_token, forward = batch.sample_token, bf16.forward

        def recording_sample(logits: Any, *args: Any) -> int:
            sampled_dtypes.add(logits.dtype)
            return sample_token(logits, *args)

        def recording_forward(adapter: str | None, **inputs: Any) -> Any:
            out = forward(adapter, **inputs)
            model_dtypes.add(out.logits.dtype)
            return out

        reference = _greedy(fp32)
        monkeypatch.setattr(batch, "sample_token", recording_sample)
        monkeypatch.setattr(bf16, "forward", recording_forward)
        served = _greedy(bf16)
    finally:
        bf16.shutdown()
    fp32.shutdown()
    assert model_dtypes == {torch.bfloat16}  # the model computes in bf16 ...
    assert sampled_dtypes == {torch.float32}  # ... and sampling sees fp32 logits
    for ids, ref in zip(served, reference):
        assert len(ids) == len(ref) == NEW_TOKENS and ids[:2] == ref[:2]
    # A random model's choices are often near ties that any rounding flips, after which the texts part: so each
    # bf16 choice is compared with the fp32 model's choice on the same prefix.
    fp32_model, agree, total = fp32.model, 0, 0
    for request, ids in zip(_requests(fp32), served):
        expected = _fp32_choices(fp32_model, fp32.prepare(request).prompt_ids, ids)
        agree += sum(a == b for a, b in zip(ids, expected))
        total += len(ids)
    assert agree >= 0.95 * total, f"bf16 chose the fp32 token at {agree} of {total} steps"
    assert sum(a == b for ids, ref in zip(served, reference) for a, b in zip(ids, ref)) >= 0.5 * total


@pytest.mark.parametrize(("stored", "served"), [("bfloat16", torch.bfloat16), ("float16", torch.bfloat16),
                                                ("float32", torch.float32)])
def test_auto_serves_the_stored_dtype_and_float16_as_bfloat16(stored: str, served: torch.dtype, model_dir: Path,
                                                              tmp_path: Path) -> None:
    from llmstack.models import load_artifact, save_model

    loaded = load_artifact(str(model_dir), dtype=stored)
    save_model(loaded.model, loaded.tokenizer, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == stored
    engine = TransformersEngine.from_source(str(tmp_path), dtype="auto", cache_size=0)
    try:
        assert _weights_dtype(engine) == served
    finally:
        engine.shutdown()


def test_engine_dtype_config_is_accepted_served_and_typos_name_the_key(model_dir: Path, tmp_path: Path) -> None:
    cfg = load_config(ServeConfig, {"model": str(model_dir), "registry": str(tmp_path / "registry"),
                                    "engine": {"dtype": "bfloat16"}})
    assert cfg.engine.dtype == "bfloat16" and load_config(ServeConfig, {}).engine.dtype == "auto"
    threads = torch.get_num_threads()
    engine = TransformersEngine.from_config(cfg)  # what a replica runs
    try:
        assert _weights_dtype(engine) == torch.bfloat16
    finally:
        engine.shutdown()
        torch.set_num_threads(threads)
    with pytest.raises(ConfigError, match=r"engine\.dtype: must be one of .*'bfloat16'.*got 'bfloat61'"):
        load_config(ServeConfig, {"engine": {"dtype": "bfloat61"}})


@pytest.mark.parametrize(("flags", "problem"), [(AVX2_ONLY, True), (AVX512_CORE, False),
                                                (AVX2_ONLY | {"avx512_bf16"}, False),
                                                (AVX2_ONLY | {"amx_bf16", "amx_tile"}, False),
                                                (frozenset({"asimd", "bf16"}), False), (frozenset(), False)])
def test_bf16_needs_native_bf16_or_avx512(flags: frozenset[str], problem: bool) -> None:
    found = precision.cpu_dtype_problem("bfloat16", flags=flags, capability="AVX2")
    assert (found is not None) == problem
    assert precision.cpu_dtype_problem("float32", flags=flags, capability="AVX2") is None


def test_refusal_names_the_missing_instruction_set_and_what_the_cpu_has(monkeypatch: pytest.MonkeyPatch,
                                                                        model_dir: Path) -> None:
    monkeypatch.setattr(precision, "cpu_flags", lambda: AVX2_ONLY)
    monkeypatch.setattr(precision, "cpu_capability", lambda: "AVX2")
    with pytest.raises(ModelLoadError) as info:
        TransformersEngine.from_source(str(model_dir), dtype="bfloat16")
    message = str(info.value)
    assert "engine.dtype" in message and "avx512_bf16 or amx_bf16" in message and "avx512f" in message
    assert "this CPU has avx2, fma" in message and "AVX2" in message and "engine.dtype: float32" in message
    assert "avx512_fp16" in precision.cpu_dtype_problem("float16") and "float16" in precision.cpu_dtype_problem("fp16")
    engine = TransformersEngine.from_source(str(model_dir), dtype="float32", cache_size=0)  # fp32 always serves
    engine.shutdown()


def test_unknown_dtype_and_quantized_artifacts_keep_their_recipe_dtype(tmp_path: Path) -> None:
    from llmstack.models import Artifact

    with pytest.raises(ModelLoadError, match="engine.dtype 'int3' is not one of auto, float32"):
        precision.canonical_dtype("int3")
    (tmp_path / "quantization.json").write_text(json.dumps({"method": "int8-weight-only", "dtype": "float32"}))
    quantized = Artifact(kind="quantized", method="int8-weight-only", directory=tmp_path, ref=None, base=None,
                         identity="q", source=str(tmp_path))
    assert precision.resolve_engine_dtype(quantized, "auto") == "auto"
    assert precision.resolve_engine_dtype(quantized, "float32") == "auto"
    with pytest.raises(ModelLoadError, match=r"runs in its recipe's dtype \(float32\); set engine.dtype: auto"):
        precision.resolve_engine_dtype(quantized, "bfloat16")
