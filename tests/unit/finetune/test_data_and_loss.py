"""Instruction tensors (response-only labels, packing, bad rows), the distillation loss, configs."""

from __future__ import annotations

import json

import pytest
import torch

from llmstack.config import load_config
from llmstack.errors import ConfigError, DataError
from llmstack.finetune import DistillConfig, DistillLoss, SweepConfig
from llmstack.finetune.data import instruction_tensors
from llmstack.train.loop import causal_lm_loss


def test_labels_cover_response_tokens_only(base) -> None:
    data = base["data"]
    labels, ids, mask = data.train["labels"], data.train["input_ids"], data.train["attention_mask"]
    supervised = labels != -100
    assert supervised.any() and (~supervised).any()
    assert bool((mask[supervised] == 1).all())  # never on padding
    assert bool((labels[supervised] == ids[supervised]).all())
    assert not supervised[:, 0].any()  # the prompt (and bos) is never a target
    assert data.eval is not None and data.num_eval_rows > 0


def test_packing_keeps_every_response_token_in_fewer_rows(base) -> None:
    packed = instruction_tensors("builtin:stdlib-qa", base["tokenizer"], max_length=128, max_rows=64, packing=True)
    plain = instruction_tensors("builtin:stdlib-qa", base["tokenizer"], max_length=128, max_rows=64)
    assert packed.train["input_ids"].shape[0] < plain.train["input_ids"].shape[0]
    assert int((packed.train["labels"] != -100).sum()) == int((plain.train["labels"] != -100).sum())
    assert torch.equal(packed.eval["input_ids"], plain.eval["input_ids"])  # eval is never packed


def test_rows_without_a_response_name_file_and_line(base, tmp_path) -> None:
    path = tmp_path / "rows.jsonl"
    rows = [{"prompt": "What is 1+1?", "response": "2"}, {"prompt": "Name a colour."},
            {"prompt": "Why?", "response": "Because."}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(DataError, match=r"rows.jsonl:2.*no 'response'"):
        instruction_tensors(str(path), base["tokenizer"], max_length=64)
    path.write_text(json.dumps({"prompt": "Hi", "response": "   "}) + "\n")
    with pytest.raises(DataError, match=r"rows.jsonl:1.*empty 'response'"):
        instruction_tensors(str(path), base["tokenizer"], max_length=64)


def test_columns_template_override_and_train_on_inputs(base, tmp_path) -> None:
    import copy

    tokenizer = copy.deepcopy(base["tokenizer"])  # instruction_tensors sets the override on the tokenizer it gets
    rows = [{"question": f"What is {i}+{i}?", "answer": str(2 * i)} for i in range(40)]
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    template = tmp_path / "phi.jinja"  # a Phi-3 layout in the tokens this tokenizer already has
    template.write_text("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
                        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    columns = {"prompt": "question", "response": "answer"}
    data = instruction_tensors(str(path), tokenizer, max_length=32, columns=columns, chat_template=str(template))
    assert tokenizer.chat_template == template.read_text()  # a model saved with it chats as it was tuned
    first = data.train["input_ids"][0][data.train["attention_mask"][0] == 1].tolist()
    assert tokenizer.decode(first) == "<|user|>\nWhat is 0+0?<|end|>\n<|assistant|>\n0<|end|>\n"
    learned = data.train["labels"][0][data.train["labels"][0] != -100].tolist()
    assert tokenizer.decode(learned) == "0<|end|>"
    everything = instruction_tensors(str(path), tokenizer, max_length=32, columns=columns, train_on_inputs=True)
    mask = everything.train["attention_mask"] == 1
    assert torch.equal(everything.train["labels"][mask], everything.train["input_ids"][mask])
    with pytest.raises(DataError, match=r"qa.jsonl:1: line 1: no instruction format matches this row "
                                        r"\(fields: answer, question\)"):
        instruction_tensors(str(path), tokenizer, max_length=32)
    tokenizer.chat_template = "{{ raise_exception('no chats today') }}"
    with pytest.raises(DataError, match=r"qa.jsonl \(train split\): row 0 \('What is 0\+0\?'\): the chat template "
                                        r"refused the conversation \(roles user, assistant\): no chats today"):
        instruction_tensors(str(path), tokenizer, max_length=32, columns=columns)


def test_distillation_loss(base) -> None:
    from llmstack.models import build_model, load_artifact

    batch = {k: v[:4] for k, v in base["data"].train.items()}
    teacher = DistillLoss(registry=base["registry"], teacher=str(base["ref"]), temperature=2.0, alpha=1.0)
    same = load_artifact(str(base["ref"]), registry=base["registry"]).model.train()
    assert float(teacher(same, batch)) == pytest.approx(0.0, abs=1e-3)  # KL of a model to itself
    student = build_model("tiny", vocab_size=same.config.vocab_size, max_seq_len=128, seed=7).train()
    soft = float(teacher(student, batch))
    assert soft > 1.0
    hard = float(causal_lm_loss(student, batch))
    mixed = DistillLoss(registry=base["registry"], teacher=str(base["ref"]), temperature=2.0, alpha=0.25)
    assert float(mixed(student, batch)) == pytest.approx(0.25 * soft + 0.75 * hard, rel=1e-4)
    student.eval()  # evaluation reports the hard-label loss, comparable across students
    assert float(mixed(student, batch)) == pytest.approx(float(causal_lm_loss(student, batch)), rel=1e-5)
    import pickle

    assert pickle.loads(pickle.dumps(mixed))._model is None  # the teacher never travels to workers


def test_distill_and_sweep_configs_report_every_problem() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(DistillConfig, {"temperature": 0, "alpha": 1.5})
    assert "temperature: must be > 0" in str(info.value) and "alpha: must be in [0, 1]" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config(SweepConfig, {"ranks": [0, 8], "learning_rates": [], "grace_period": 0})
    text = str(info.value)
    assert "ranks: every value must be > 0" in text and "learning_rates: must list" in text
    assert "grace_period: must be >= 1" in text
    with pytest.raises(ConfigError, match="finetune.lora.rank: must be >= 1"):
        load_config(SweepConfig, {"finetune": {"lora": {"rank": 0}}})
    cfg = load_config(SweepConfig, None, ["search=grid", "ranks=[4, 8]", "finetune.training.max_steps=5"])
    assert cfg.ranks == [4, 8] and cfg.finetune.training.max_steps == 5
