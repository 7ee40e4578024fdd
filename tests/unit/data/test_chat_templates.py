"""Assistant masking for stock chat templates (Llama-3, Qwen2.5/ChatML, Gemma, Mistral, Phi-3), the template
override, train_on_inputs, and the conversations a template refuses or rewrites."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmstack.data import IGNORE_INDEX, tokenize_instructions
from llmstack.data.chat_templates import CHATML_TEMPLATE, resolve_chat_template
from llmstack.errors import DataError

from .chat_fixtures import FAMILIES, GEMMA_NO_SYSTEM, MISTRAL, REWRITING, family_tokenizer

SYSTEM = {"role": "system", "content": "You answer tersely."}
TURNS = [{"role": "user", "content": "Name a stdlib JSON module."},
         {"role": "assistant", "content": "json"},
         {"role": "user", "content": "And for CSV?"},
         {"role": "assistant", "content": "The csv module:\ncsv.reader reads rows."},
         {"role": "user", "content": "Thanks!"},
         {"role": "assistant", "content": "You're welcome."}]


def _spans(ids: list[int], labels: list[int]) -> list[list[int]]:
    """The runs of labelled tokens, in order."""
    spans: list[list[int]] = []
    previous = IGNORE_INDEX
    for token, label in zip(ids, labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            if previous == IGNORE_INDEX:
                spans.append([])
            spans[-1].append(token)
        previous = label
    return spans


def _conversation(family: str) -> list[dict[str, str]]:
    return TURNS if family == "mistral" else [SYSTEM, *TURNS]  # Mistral's template has no system role


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_stock_templates_label_content_and_end_of_turn(tokenizer, family: str) -> None:
    spec = FAMILIES[family]
    tok = family_tokenizer(tokenizer, spec)
    conversation = _conversation(family)
    rows = [{"messages": conversation}, {"prompt": "What does json.dumps return?", "response": "A str."}]
    examples = tokenize_instructions(rows, tok, max_length=1024)
    for row, example in zip(rows, examples, strict=True):
        messages = row.get("messages") or [{"role": "user", "content": row["prompt"]},
                                           {"role": "assistant", "content": row["response"]}]
        expected = tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        assert example["input_ids"] == list(expected)
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        decoded = [tok.decode(span) for span in _spans(example["input_ids"], example["labels"])]
        # Mistral writes " " + content: the space is part of the answer's first token
        assert [text.removeprefix(" ") for text in decoded] == [a + spec.end_of_turn for a in answers]
        if spec.bos is not None:  # the template writes BOS; tokenizing the render must not add a second one
            bos = tok.convert_tokens_to_ids(spec.bos)
            assert example["input_ids"][0] == bos and example["input_ids"].count(bos) == 1
            assert tok("text")["input_ids"][0] == bos  # (this tokenizer does add BOS to plain text)


def test_trimmed_content_and_closing_eos(tokenizer) -> None:
    """Llama-3 trims content; Phi-3 writes eos once after the last turn, which is not an answer token."""
    llama = family_tokenizer(tokenizer, FAMILIES["llama3"])
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  padded answer \n"}]}
    (example,) = tokenize_instructions([row], llama, max_length=256)
    assert [llama.decode(s) for s in _spans(example["input_ids"], example["labels"])] == ["padded answer<|eot_id|>"]
    phi = family_tokenizer(tokenizer, FAMILIES["phi3"])
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "answer"}]}
    (example,) = tokenize_instructions([row], phi, max_length=256)
    assert example["input_ids"][-1] == phi.eos_token_id and example["labels"][-1] == IGNORE_INDEX
    assert [phi.decode(s) for s in _spans(example["input_ids"], example["labels"])] == ["answer<|end|>"]


def test_answer_merging_with_the_prompt_starts_labels_after_it(tokenizer) -> None:
    """Phi-3 keeps content as is: "\n" + "  indented" tokenizes as "\n " + " indented" in this BPE."""
    phi = family_tokenizer(tokenizer, FAMILIES["phi3"])
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  indented"}]}
    prompt = phi.apply_chat_template(row["messages"][:1], add_generation_prompt=True, return_dict=True)["input_ids"]
    with pytest.warns(UserWarning, match=r"1 assistant turns \(rows 0\) begin with text the tokenizer joins"):
        (example,) = tokenize_instructions([row], phi, max_length=256)
    assert example["input_ids"][: len(prompt)] != list(prompt)  # the merge this test is about
    labelled = [phi.decode(s) for s in _spans(example["input_ids"], example["labels"])]
    assert len(labelled) == 1 and labelled[0].endswith("indented<|end|>")
    first = next(i for i, label in enumerate(example["labels"]) if label != IGNORE_INDEX)
    assert phi.decode(example["input_ids"][:first]).endswith("<|assistant|>\n ")  # the joined token stays prompt


def test_template_that_rewrites_history_is_refused_naming_the_row(tokenizer) -> None:
    tok = family_tokenizer(tokenizer, FAMILIES["qwen2.5"], template=REWRITING)
    single = {"messages": [{"role": "user", "content": "2+2?"},
                           {"role": "assistant", "content": "<think>add</think>4"}]}
    multi = {"messages": [{"role": "user", "content": "Pick a number"},
                          {"role": "assistant", "content": "<think>any will do</think>7"},
                          {"role": "user", "content": "Another"},
                          {"role": "assistant", "content": "8"}]}
    (ok,) = tokenize_instructions([single], tok, max_length=256)  # one turn: nothing earlier to rewrite
    assert tok.decode([t for t in ok["labels"] if t != IGNORE_INDEX]) == "<think>add</think>4<|im_end|>"
    with pytest.raises(DataError, match=r"row 1 \('Pick a number'\): the chat template rewrites earlier turns: "
                                        r"the conversation up to assistant turn 1"):
        tokenize_instructions([single, multi], tok, max_length=256)
    whole = tokenize_instructions([single, multi], tok, max_length=256, train_on_inputs=True)
    assert whole[1]["labels"] == whole[1]["input_ids"]
    assert whole[1]["input_ids"] == list(tok.apply_chat_template(multi["messages"], return_dict=True)["input_ids"])


def test_generation_prompt_unlike_the_rendered_turn_is_refused(tokenizer) -> None:
    """A generation prompt that opens the answer differently from the rendered history cannot be masked."""
    tok = family_tokenizer(tokenizer, FAMILIES["qwen2.5"],
                           template=FAMILIES["qwen2.5"].template.replace("<|im_start|>assistant\n{% endif %}",
                                                                         "<|im_start|>assistant\n\n{% endif %}"))
    with pytest.raises(DataError, match=r"row 0 \('Name a stdlib JSON module.'\): the chat template's generation "
                                        r"prompt before assistant turn 2 is not how that turn starts"):
        tokenize_instructions([{"messages": [SYSTEM, *TURNS[:2]]}], tok, max_length=256)


@pytest.mark.parametrize("template,messages,reason", [
    (GEMMA_NO_SYSTEM, [SYSTEM, *TURNS[:2]], "this template has no system role"),
    (MISTRAL, [TURNS[0], TURNS[2], TURNS[1]], r"turns must go user, assistant, user, assistant"),
])
def test_template_refusals_name_the_row_and_the_template_message(tokenizer, template: str, messages: list,
                                                                  reason: str) -> None:
    tok = family_tokenizer(tokenizer, FAMILIES["gemma"], template=template)
    rows = [{"prompt": "fine", "response": "yes"}, {"messages": messages}]
    with pytest.raises(DataError, match=rf"row 1 \('Name a stdlib JSON module.'\): the chat template refused the "
                                        rf"conversation \(roles .*\): {reason}"):
        tokenize_instructions(rows, tok, max_length=256)


def test_conversation_opening_with_the_assistant_is_refused(tokenizer) -> None:
    tok = family_tokenizer(tokenizer, FAMILIES["qwen2.5"])
    with pytest.raises(DataError, match="row 0 .*starts with an assistant turn"):
        tokenize_instructions([{"messages": [TURNS[1], TURNS[0], TURNS[3]]}], tok, max_length=256)


def test_row_numbers_count_every_row_given(tokenizer) -> None:
    """Plain rows in between do not shift the row index of a chat the template refuses."""
    tok = family_tokenizer(tokenizer, FAMILIES["gemma"], template=GEMMA_NO_SYSTEM)
    rows = [{"text": "plain"}, {"prompt": "p", "completion": "c"}, {"messages": [SYSTEM, *TURNS[:2]]}]
    with pytest.raises(DataError, match=r"^row 2 "):
        tokenize_instructions(rows, tok, max_length=256)


def test_chat_template_override_by_name_file_or_text(tokenizer, tmp_path: Path) -> None:
    tok = family_tokenizer(tokenizer, FAMILIES["qwen2.5"])
    tok.chat_template = None
    rows = [{"messages": [SYSTEM, *TURNS[:2]]}]
    with pytest.raises(DataError, match="no chat template.*set data.chat_template.*chatml"):
        tokenize_instructions(rows, tok, max_length=256)
    template = resolve_chat_template("chatml", tok)
    assert template == CHATML_TEMPLATE
    (example,) = tokenize_instructions(rows, tok, max_length=256, chat_template=template)
    expected = tok.apply_chat_template(rows[0]["messages"], chat_template=CHATML_TEMPLATE, return_dict=True)
    assert example["input_ids"] == list(expected["input_ids"])
    assert tok.decode(example["input_ids"]).startswith("<|im_start|>system\nYou answer tersely.<|im_end|>\n")
    assert [tok.decode(s) for s in _spans(example["input_ids"], example["labels"])] == ["json<|im_end|>"]
    path = tmp_path / "phi.jinja"
    path.write_text(FAMILIES["phi3"].template)
    assert resolve_chat_template(str(path)) == FAMILIES["phi3"].template
    assert resolve_chat_template("{{ messages[0]['content'] }}") == "{{ messages[0]['content'] }}"
    with pytest.raises(DataError, match=r"'chatm' is neither a known template \(chatml, llmstack\) nor an existing"):
        resolve_chat_template("chatm")
    with pytest.raises(DataError, match=r"'chatml' needs the tokens <\|im_start\|>, <\|im_end\|>"):
        resolve_chat_template("chatml", tokenizer)  # llmstack's own tokenizer has neither


@pytest.mark.parametrize("family", ["native", "qwen2.5"])
def test_train_on_inputs_labels_every_token(tokenizer, family: str) -> None:
    tok = tokenizer if family == "native" else family_tokenizer(tokenizer, FAMILIES[family])
    rows = [{"messages": [SYSTEM, *TURNS]}, {"prompt": "p", "completion": " c"}]
    masked = tokenize_instructions(rows, tok, max_length=1024)
    whole = tokenize_instructions(rows, tok, max_length=1024, train_on_inputs=True)
    for m, w in zip(masked, whole, strict=True):
        assert w["input_ids"] == m["input_ids"] and w["labels"] == w["input_ids"]
        assert IGNORE_INDEX in m["labels"]


def test_plain_rows_need_no_template(tokenizer) -> None:
    """TRL prompt/completion rows: the prompt as the tokenizer encodes text, completion and eos learned."""
    tok = family_tokenizer(tokenizer, FAMILIES["llama3"])
    tok.chat_template = None
    rows = [{"prompt": "The capital of France is", "completion": " Paris."}, {"text": "import json"}]
    completion, text = tokenize_instructions(rows, tok, max_length=64)
    prompt_ids = tok("The capital of France is")["input_ids"]  # BOS included, as this tokenizer adds it
    assert completion["input_ids"][: len(prompt_ids)] == prompt_ids and prompt_ids[0] == tok.bos_token_id
    assert tok.decode(completion["input_ids"][len(prompt_ids):]) == " Paris.<|end_of_text|>"
    assert completion["labels"][: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    assert completion["labels"][len(prompt_ids):] == completion["input_ids"][len(prompt_ids):]
    assert text["labels"] == text["input_ids"] == [*tok("import json")["input_ids"], tok.eos_token_id]


def test_the_config_knows_every_named_template() -> None:
    """InstructionDataConfig checks data.chat_template against the config's list; it names exactly these."""
    from llmstack.config import CHAT_TEMPLATE_NAMES
    from llmstack.data.chat_templates import NAMED_TEMPLATES

    assert tuple(NAMED_TEMPLATES) == CHAT_TEMPLATE_NAMES
