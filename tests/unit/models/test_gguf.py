"""GGUF files as model sources: a tiny LLaMA written as GGUF here (gguf's writer), imported, loaded, refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from llmstack.errors import ModelLoadError, RegistryError  # noqa: E402
from llmstack.models import describe_artifact, load_artifact  # noqa: E402
from llmstack.models.gguf import import_model, read_gguf_info, registry_name_for  # noqa: E402
from llmstack.registry import Registry  # noqa: E402

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 64, 2, 4, 2, 128


def write_tiny_llama_gguf(path: Path, tokenizer: Any, *, matrices: str = "Q8_0", architecture: str = "llama",
                          seed: int = 0) -> Path:
    """A random-init 2-layer LLaMA as llama.cpp lays it out, with ``tokenizer``'s byte-level BPE vocabulary;
    weight matrices stored as ``matrices`` (Q8_0 block-quantized, F16 or F32), norms as F32."""
    from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType
    from gguf.quants import quantize

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = sorted(state["model"]["vocab"].items(), key=lambda item: item[1])
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]]
    special = {t["content"] for t in state["added_tokens"]}
    rng = np.random.default_rng(seed)
    writer = GGUFWriter(str(path), architecture)
    writer.add_name("tiny test llama")
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(len(vocab))
    file_type = {"Q8_0": LlamaFileType.MOSTLY_Q8_0, "F16": LlamaFileType.MOSTLY_F16, "F32": LlamaFileType.ALL_F32}
    writer.add_file_type(file_type[matrices])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([token for token, _ in vocab])
    writer.add_token_types([3 if token in special else 1 for token, _ in vocab])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)

    def matrix(name: str, rows: int, cols: int) -> None:
        values = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
        if matrices == "Q8_0":
            writer.add_tensor(name, quantize(values, GGMLQuantizationType.Q8_0), raw_dtype=GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, values.astype(np.float16) if matrices == "F16" else values)

    def norm(name: str) -> None:
        writer.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32))

    head_dim = HIDDEN // HEADS
    matrix("token_embd.weight", len(vocab), HIDDEN)
    for layer in range(LAYERS):
        norm(f"blk.{layer}.attn_norm.weight")
        matrix(f"blk.{layer}.attn_q.weight", HIDDEN, HIDDEN)
        matrix(f"blk.{layer}.attn_k.weight", KV_HEADS * head_dim, HIDDEN)
        matrix(f"blk.{layer}.attn_v.weight", KV_HEADS * head_dim, HIDDEN)
        matrix(f"blk.{layer}.attn_output.weight", HIDDEN, HIDDEN)
        norm(f"blk.{layer}.ffn_norm.weight")
        matrix(f"blk.{layer}.ffn_gate.weight", FFN, HIDDEN)
        matrix(f"blk.{layer}.ffn_up.weight", FFN, HIDDEN)
        matrix(f"blk.{layer}.ffn_down.weight", HIDDEN, FFN)
    norm("output_norm.weight")
    matrix("output.weight", len(vocab), HIDDEN)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tokenizer(architecture_tokenizer: Any) -> Any:
    """The session's small BPE of the tiny-architecture tests (tests/unit/conftest.py)."""
    return architecture_tokenizer


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> Path:
    folder = tmp_path_factory.mktemp("gguf")
    return write_tiny_llama_gguf(folder / "Tiny Llama (test).Q8_0.gguf", tokenizer)


def test_header_is_read_without_loading_tensors(tiny_gguf: Path, tmp_path: Path, tokenizer: Any) -> None:
    info = read_gguf_info(tiny_gguf)
    assert (info.architecture, info.name, info.quantized, info.native_dtype) == ("llama", "tiny test llama", True,
                                                                                 "float32")
    f16 = read_gguf_info(write_tiny_llama_gguf(tmp_path / "f16.gguf", tokenizer, matrices="F16"))
    assert (f16.quantized, f16.native_dtype) == (False, "float16")


def test_a_gguf_file_is_imported_once_and_loads_as_transformers_dequantizes_it(tiny_gguf: Path,
                                                                             tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    registry = Registry(str(tmp_path / "registry"))
    artifact = describe_artifact(str(tiny_gguf), registry=registry)
    assert artifact.kind == "model" and str(artifact.ref) == "Tiny-Llama-test-.Q8_0@v1"
    manifest = registry.manifest(artifact.ref)
    sha = manifest.extra["gguf_sha256"]
    assert manifest.parents == [f"gguf:sha256:{sha}"] and len(sha) == 64
    assert (manifest.extra["gguf_architecture"], manifest.extra["dtype"]) == ("llama", "float32")
    assert any(name.endswith(".safetensors") for name in manifest.files) and not any(
        name.endswith(".gguf") for name in manifest.files)
    assert json.loads((artifact.directory / "config.json").read_text()).get("quantization_config") is None

    # Again, by path or by import_model: the same version (keyed by the file's sha256), no copy.
    assert describe_artifact(str(tiny_gguf), registry=registry).ref == artifact.ref
    copy = shutil.copy(tiny_gguf, tmp_path / "renamed.gguf")
    assert import_model(copy, registry=registry) == artifact.ref
    assert [m.ref for m in registry.list()] == [artifact.ref]
    # Under a name of the user's choosing: a version of that name.
    named = import_model(tiny_gguf, name="tiny", registry=registry)
    assert str(named) == "tiny@v1" and import_model(tiny_gguf, name="tiny", registry=registry) == named
    # Another dtype is another version.
    bf16 = import_model(tiny_gguf, name="tiny", registry=registry, dtype="bfloat16")
    assert str(bf16) == "tiny@v2"
    assert load_artifact(bf16, registry=registry).model.dtype == torch.bfloat16

    loaded = load_artifact(str(tiny_gguf), registry=registry)
    reference = AutoModelForCausalLM.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name,
                                                     dtype=torch.float32).eval()
    ids = loaded.tokenizer("def main(): return 1", return_tensors="pt")["input_ids"]
    assert ids.shape[1] > 3
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_an_architecture_transformers_cannot_load_is_named(tmp_path: Path, tokenizer: Any) -> None:
    odd = write_tiny_llama_gguf(tmp_path / "odd.gguf", tokenizer, architecture="rwkv7", matrices="F32")
    with pytest.raises(ModelLoadError, match=r"odd.gguf: GGUF architecture 'rwkv7' is not one transformers can "
                                             r"load \(it loads: llama, "):
        import_model(odd, registry=Registry(str(tmp_path / "registry")))
    with pytest.raises(ModelLoadError, match=r"not a readable GGUF file"):
        read_gguf_info(tmp_path / "odd.gguf.missing")


def test_a_directory_is_imported_under_the_given_name_once(world: dict[str, Any], tmp_path: Path) -> None:
    directory = shutil.copytree(world["registry"].fetch(world["ref"]), tmp_path / "My Model")
    registry = Registry(str(tmp_path / "registry"))
    ref = import_model(directory, name="mine", registry=registry)
    assert str(ref) == "mine@v1" and import_model(directory, name="mine", registry=registry) == ref
    assert str(import_model(directory, registry=registry)) == "My-Model@v1"
    with pytest.raises(ModelLoadError, match=r"already registry version mine@v1"):
        import_model("mine@v1", name="other", registry=registry)
    with pytest.raises(RegistryError, match=r"invalid artifact name '\.\./x'"):
        import_model(directory, name="../x", registry=registry)


def test_a_gguf_fine_tune_base_is_registered_once_under_its_own_name(tiny_gguf: Path, tmp_path: Path) -> None:
    from llmstack.finetune.lora import ensure_base_ref

    registry = Registry(str(tmp_path / "registry"))
    ref = ensure_base_ref(str(tiny_gguf), registry)
    assert str(ref) == "Tiny-Llama-test-.Q8_0@v1" and ensure_base_ref(str(tiny_gguf), registry) == ref
    assert registry.manifest(ref).extra["registered_by"] == "finetune (outside base)"


def test_registry_import_on_the_command_line(tiny_gguf: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from llmstack.cli import main

    registry = str(tmp_path / "registry")
    assert main(["registry", "import", str(tiny_gguf), "--name", "cli-tiny", "--registry", registry]) == 0
    assert capsys.readouterr().out.startswith("cli-tiny@v1  (")
    assert Registry(registry).manifest("cli-tiny@v1").extra["gguf_file"] == tiny_gguf.name
    assert main(["registry", "import", str(tmp_path / "absent.gguf"), "--registry", registry]) != 0
    error = capsys.readouterr().err
    assert error.startswith("llmstack: error:") and "absent.gguf is not a GGUF file" in error and error.count("\n") == 1


@pytest.mark.parametrize(("source", "name"), [
    ("/m/SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct.Q4_1"), ("/m/My Model (v2)/", "My-Model-v2"),
    ("org/Qwen2.5-0.5B", "Qwen2.5-0.5B"), ("/m/..hidden..x.gguf", "hidden.x"), ("/m/$$$.gguf", "model")])
def test_registry_names_come_from_the_model(source: str, name: str) -> None:
    assert registry_name_for(source) == name


@pytest.mark.slow
def test_the_real_smollm2_gguf_imports_and_answers(smollm2: dict[str, Any]) -> None:
    # The file, named by path, is the session's one import of it (tests/conftest.py imports it, ~25 s; the
    # real-model lifecycle test builds on it): found by its sha256, not converted again.
    loaded = load_artifact(str(smollm2["gguf"]), registry=smollm2["registry"])
    assert loaded.ref == smollm2["ref"]
    assert loaded.model.config.model_type == "llama" and loaded.model.dtype == torch.float32
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                  return_dict=True)
    out = loaded.model.generate(**inputs, max_new_tokens=10, do_sample=False)
    assert "Paris" in loaded.tokenizer.decode(out[0][inputs["input_ids"].shape[1]:])
