"""Dataset formats users bring (ShareGPT, Alpaca, TRL, plain text, Hugging Face datasets), column mapping."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmstack.config import FinetuneConfig, load_config
from llmstack.data import IGNORE_INDEX, load_instructions, tokenize_instructions
from llmstack.errors import ConfigError, DataError

QA = [{"role": "user", "content": "Which module parses JSON?"}, {"role": "assistant", "content": "json"}]


def _jsonl(path: Path, rows: list) -> str:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_sharegpt_conversations(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "sharegpt.jsonl", [
        {"conversations": [{"from": "system", "value": "Be brief."},
                           {"from": "human", "value": "Which module parses JSON?"},
                           {"from": "gpt", "value": "json"}]},
        {"system": "Be brief.", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
        {"messages": [{"from": "user", "value": "q2"}, {"from": "assistant", "value": "a2"}]},
    ])
    rows = load_instructions(path)
    assert rows[0] == {"messages": [{"role": "system", "content": "Be brief."}, *QA]}
    assert rows[1]["messages"][0] == {"role": "system", "content": "Be brief."}  # the row's system field
    assert rows[2] == {"messages": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]}
    _jsonl(tmp_path / "bad.jsonl", [{"conversations": [{"from": "human", "value": "q"},
                                                       {"from": "function_call", "value": "{}"}]}])
    with pytest.raises(DataError, match=r"bad.jsonl:1: line 1: conversations entry 1 is from 'function_call'; "
                                        r"allowed: human, user, gpt"):
        load_instructions(str(tmp_path / "bad.jsonl"))
    _jsonl(tmp_path / "bad.jsonl", [{"conversations": [{"role": "user", "text": "q"}]}])
    with pytest.raises(DataError, match=r"entry 0 must be an object with 'from' and 'value' \(found: role, text\)"):
        load_instructions(str(tmp_path / "bad.jsonl"))


def test_alpaca_json_array_and_jsonl(tmp_path: Path) -> None:
    items = [{"instruction": "Translate to French", "input": "cat", "output": "chat"},
             {"instruction": "Name a colour", "input": "", "output": "red"}]
    (tmp_path / "alpaca.json").write_text(json.dumps(items, indent=2))
    expected = [{"prompt": "Translate to French\n\ncat", "response": "chat"},
                {"prompt": "Name a colour", "response": "red"}]
    assert load_instructions(str(tmp_path / "alpaca.json")) == expected
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(i) for i in items))  # JSON lines named .json
    assert load_instructions(str(tmp_path / "lines.json")) == expected
    assert load_instructions(_jsonl(tmp_path / "alpaca.jsonl", items)) == expected
    (tmp_path / "broken.json").write_text('[{"instruction": "a", "output": "b"},')
    with pytest.raises(DataError, match=r"broken.json: not valid JSON"):
        load_instructions(str(tmp_path / "broken.json"))
    (tmp_path / "missing.json").write_text(json.dumps([items[0], {"instruction": "x"}]))
    with pytest.raises(DataError, match=r"missing.json: item 1: row has no 'output'"):
        load_instructions(str(tmp_path / "missing.json"))


def test_trl_prompt_completion_and_text_rows(tmp_path: Path, tokenizer) -> None:
    path = _jsonl(tmp_path / "trl.jsonl", [
        {"prompt": "The capital of France is", "completion": " Paris."},
        {"prompt": [QA[0]], "completion": [QA[1]]},
        {"text": "def f():\n    return 1"},
    ])
    rows = load_instructions(path)
    assert rows == [{"prompt": "The capital of France is", "completion": " Paris."}, {"messages": QA},
                    {"text": "def f():\n    return 1"}]
    completion, chat, text = tokenize_instructions(rows, tokenizer, max_length=128)
    learned = [t for t in completion["labels"] if t != IGNORE_INDEX]
    assert tokenizer.decode(learned) == " Paris.<|eos|>"
    assert tokenizer.decode(completion["input_ids"]) == "The capital of France is Paris.<|eos|>"  # no template
    assert tokenizer.decode([t for t in chat["labels"] if t != IGNORE_INDEX]) == "json<|eos|>"
    assert text["labels"] == text["input_ids"] and tokenizer.decode(text["input_ids"]).endswith("return 1<|eos|>")
    _jsonl(tmp_path / "mixed.jsonl", [{"prompt": [QA[0]], "completion": "json"}])
    with pytest.raises(DataError, match="'prompt' is a list and 'completion' a str; TRL rows have both strings"):
        load_instructions(str(tmp_path / "mixed.jsonl"))
    _jsonl(tmp_path / "blank.jsonl", [{"text": "  "}])
    with pytest.raises(DataError, match=r"blank.jsonl:1: line 1: row has an empty 'text'"):
        load_instructions(str(tmp_path / "blank.jsonl"))


def test_column_mapping_on_jsonl_parquet_and_saved_dataset(tmp_path: Path) -> None:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {"prompt": "question", "response": "answer"}
    records = [{"question": "Which module parses JSON?", "answer": "json", "id": 1},
               {"question": "Which module reads CSV?", "answer": "csv", "id": 2}]
    expected = [{"prompt": r["question"], "response": r["answer"]} for r in records]
    path = _jsonl(tmp_path / "qa.jsonl", records)
    with pytest.raises(DataError, match=r"qa.jsonl:1: line 1: no instruction format matches this row \(fields: "
                                        r"answer, id, question\).*data.columns"):
        load_instructions(path)
    assert load_instructions(path, columns=columns) == expected
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "qa.parquet")
    assert load_instructions(str(tmp_path / "qa.parquet"), columns=columns) == expected
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "saved"))
    assert load_instructions(str(tmp_path / "saved"), columns=columns) == expected
    with pytest.raises(DataError, match=r"saved: row 0: data.columns maps \{prompt: query, response: answer\} but "
                                        r"the row has no 'query' \(fields: answer, id, question\)"):
        load_instructions(str(tmp_path / "saved"), columns={"prompt": "query", "response": "answer"})
    with pytest.raises(DataError, match=r"data.columns: unknown field 'question'; map one of messages, "):
        load_instructions(path, columns={"question": "prompt"})


def test_hugging_face_datasets_through_load_dataset(tmp_path: Path) -> None:
    (tmp_path / "rows.csv").write_text("question,answer\nWhich module parses JSON?,json\nAnd CSV?,csv\n")
    source = f"hf:csv?data_files={tmp_path / 'rows.csv'}"
    rows = load_instructions(source, columns={"prompt": "question", "response": "answer"})
    assert rows == [{"prompt": "Which module parses JSON?", "response": "json"},
                    {"prompt": "And CSV?", "response": "csv"}]
    json_source = f"hf:json?data_files={_jsonl(tmp_path / 'chat.jsonl', [{'messages': QA}])}"
    assert load_instructions(json_source) == [{"messages": QA}]
    folder = tmp_path / "alpaca-repo"  # a dataset folder as cloned from the hub: the builder is inferred
    folder.mkdir()
    _jsonl(folder / "train.jsonl", [{"instruction": "Name a colour", "output": "red"}])
    assert load_instructions(f"hf:{folder}") == [{"prompt": "Name a colour", "response": "red"}]
    with pytest.raises(DataError, match=r"datasets.load_dataset\('json', split='train', data_files='.*nothing.jsonl'\) "
                                        r"failed .*hf:json\?data_files=rows.jsonl"):
        load_instructions(f"hf:json?data_files={tmp_path / 'nothing.jsonl'}")
    with pytest.raises(DataError, match=r"unknown option subset"):
        load_instructions("hf:org/name?subset=x")


def test_finetune_config_data_fields(tmp_path: Path) -> None:
    cfg = load_config(FinetuneConfig, {"data": {"columns": {"prompt": "question", "response": "answer"},
                                                "chat_template": "chatml", "train_on_inputs": True}})
    assert cfg.data.columns == {"prompt": "question", "response": "answer"}
    assert cfg.data.chat_template == "chatml" and cfg.data.train_on_inputs is True
    assert load_config(FinetuneConfig).data.train_on_inputs is False
    template = tmp_path / "t.jinja"
    template.write_text("{{ messages }}")
    assert load_config(FinetuneConfig, {}, [f"data.chat_template={template}"]).data.chat_template == str(template)
    with pytest.raises(ConfigError) as caught:
        load_config(FinetuneConfig, {"data": {"columns": {"question": "q"}, "chat_template": "chat-ml",
                                              "train_on_inputs": "yes"}})
    text = str(caught.value)
    assert "data.train_on_inputs: expected true or false" in text
    with pytest.raises(ConfigError) as caught:
        load_config(FinetuneConfig, {"data": {"columns": {"question": "q"}, "chat_template": "chat-ml"}})
    text = str(caught.value)
    assert "data.columns: unknown field 'question'" in text
    assert "data.chat_template: 'chat-ml' is neither a known template (chatml, llmstack)" in text
