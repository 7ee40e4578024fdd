"""Distillation between non-LLaMA models from Hugging Face directories: the loss, padded vocabularies, and the
refusal of a student whose tokenizer is not the teacher's (all before any Ray work)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from llmstack.errors import ConfigError
from llmstack.finetune.distill import DistillLoss, check_same_tokenizer, distill


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, architecture_dir: Any, architecture_tokenizer: Any) -> dict:
    from llmstack.finetune.data import instruction_tensors
    from llmstack.finetune.lora import ensure_base_ref
    from llmstack.models import load_artifact
    from llmstack.registry import Registry

    root = tmp_path_factory.mktemp("distill-arch")
    registry = Registry(str(root / "registry"))
    teacher_dir = architecture_dir("qwen2")
    ref = ensure_base_ref(str(teacher_dir), registry, name="qwen2-teacher")
    teacher = load_artifact(str(ref), registry=registry, with_tokenizer=False).model
    data = instruction_tensors("builtin:stdlib-qa", architecture_tokenizer, max_length=64, max_rows=16)
    batch = {k: v[:4] for k, v in data.train.items()}
    return {"registry": registry, "ref": ref, "teacher": teacher, "teacher_dir": teacher_dir, "batch": batch,
            "root": Path(root)}


def _loss(setup: dict, student: Any, **kwargs: Any) -> torch.Tensor:
    loss_fn = DistillLoss(registry=setup["registry"], teacher=str(setup["ref"]), temperature=2.0, alpha=1.0, **kwargs)
    student.train()
    return loss_fn(student, setup["batch"])


def test_soft_loss_is_zero_for_the_teacher_itself_and_trains_a_smaller_student(setup: dict) -> None:
    same = _loss(setup, copy.deepcopy(setup["teacher"]))
    assert abs(float(same)) < 1e-3  # KL(teacher || teacher) = 0: the teacher really is the Qwen2 directory
    from transformers import Qwen2ForCausalLM

    config = copy.deepcopy(setup["teacher"].config)
    config.num_hidden_layers, config.layer_types = 1, config.layer_types[:1]  # a smaller student, same family
    torch.manual_seed(1)
    student = Qwen2ForCausalLM(config)
    loss = _loss(setup, student)
    assert float(loss) > 1.0
    loss.backward()
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)


def test_padded_student_vocabulary_compares_the_shared_tokens(setup: dict) -> None:
    padded = copy.deepcopy(setup["teacher"])
    teacher_vocab = setup["teacher"].config.vocab_size
    padded.resize_token_embeddings(teacher_vocab + 64)  # one tokenizer, another multiple of 64
    assert abs(float(_loss(setup, padded, shared_vocab=teacher_vocab))) < 1e-3
    with pytest.raises(RuntimeError):  # without it the two distributions have different supports
        _loss(setup, padded)


def _other_tokenizer(size: int) -> Any:
    from llmstack.data import train_tokenizer

    texts = [f"SELECT column_{i} FROM table_{i % 7} WHERE id = {i * 13};" for i in range(400)]
    return train_tokenizer(texts, vocab_size=size)


def test_student_with_another_tokenizer_is_refused_even_at_equal_size(setup: dict, architecture_tokenizer: Any,
                                                                      tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    other = _other_tokenizer(len(architecture_tokenizer))
    student_dir = tmp_path / "gpt2-other-tokenizer"
    config = GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=128, vocab_size=len(architecture_tokenizer),
                        eos_token_id=other.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(student_dir)
    other.save_pretrained(student_dir)
    with pytest.raises(ConfigError) as info:
        distill(teacher=str(setup["teacher_dir"]), student=str(student_dir), data={"source": "builtin:stdlib-qa"},
                registry=setup["registry"], overrides=["data.block_size=64"], progress=False)
    message = str(info.value)
    assert "student: the tokenizer of" in message
    assert "tokens differ" in message and "preset:" in message


def test_same_tokenizer_passes_the_check(architecture_tokenizer: Any) -> None:
    check_same_tokenizer(architecture_tokenizer, copy.deepcopy(architecture_tokenizer), teacher="t", student="s")
    with pytest.raises(ConfigError, match=r"\(320 tokens\)"):
        check_same_tokenizer(architecture_tokenizer, _other_tokenizer(320), teacher="t", student="s")
