from __future__ import annotations

import pytest
import torch

from llmstack.errors import ConfigError, ModelLoadError
from llmstack.models import build_model, count_parameters, load_artifact, preset_config, save_model


@pytest.mark.parametrize("name, low, high", [("tiny", 1e6, 5e6), ("small", 1e7, 1e8), ("base", 1e8, 2e8)])
def test_preset_sizes(name, low, high):
    from transformers import LlamaForCausalLM

    config = preset_config(name, vocab_size=4096)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    assert low <= count_parameters(model) <= high
    assert config.model_type == "llama"


def test_build_is_deterministic_and_forward_works():
    a = build_model("tiny", vocab_size=256, seed=3)
    b = build_model("tiny", vocab_size=256, seed=3)
    c = build_model("tiny", vocab_size=256, seed=4)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)
    logits = a(torch.randint(0, 256, (2, 16))).logits
    assert logits.shape == (2, 16, 256)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'huge'; known: tiny, small, base"):
        build_model("huge", vocab_size=256)


def test_save_and_load_local_directory_is_safetensors(tmp_path):
    model = build_model("tiny", vocab_size=256, seed=0)
    save_model(model, None, tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").is_file()
    assert not list((tmp_path / "m").glob("*.bin"))
    loaded = load_artifact(tmp_path / "m", with_tokenizer=False).model
    ids = torch.randint(0, 256, (1, 8))
    model.eval()
    assert torch.allclose(model(ids).logits, loaded(ids).logits, atol=1e-6)


def test_directory_without_safetensors_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a pickle you want to load")
    with pytest.raises(ModelLoadError, match="safetensors only"):
        load_artifact(tmp_path, with_tokenizer=False)


def test_hub_id_offline_says_how_to_pass_a_local_directory(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match=r"cannot fetch hub model 'someorg/some-model'.*local directory"):
        load_artifact("someorg/some-model")
