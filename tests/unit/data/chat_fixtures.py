"""Chat formats of common model families, as small fixtures: a Jinja template written for these tests that
reproduces each family's layout, attached to a copy of llmstack's trained tokenizer with that family's special
tokens added (no download). Each entry also names the tokens that close an assistant turn.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

# Llama-3 instruct: header blocks, content trimmed, <|eot_id|> closes every turn; BOS written by the template.
LLAMA3 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

# Qwen2.5 / SmolLM2: ChatML, with a default system message when the conversation has none.
QWEN_CHATML = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Gemma 3: the assistant is "model", a system message is folded into the first user turn.
GEMMA = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set head = messages[0]['content'] + '\n\n' %}{% set turns = messages[1:] %}"
    "{% else %}{% set head = '' %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n{{ (head if loop.first else '') + (message['content'] | trim) }}<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

# Gemma 2 style: the same layout, but a system message is refused.
GEMMA_NO_SYSTEM = (
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('this template has no system role') }}{% endif %}"
    + GEMMA
)

# Mistral instruct v0.x: [INST] blocks as plain text, roles must alternate starting with the user, no system.
MISTRAL = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ raise_exception('no system messages here') }}{% endif %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('turns must go user, assistant, user, assistant, ...') }}{% endif %}"
    "{% if message['role'] == 'user' %}[INST] {{ message['content'] }} [/INST]"
    "{% else %} {{ message['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)

# Phi-3: <|role|>\n ... <|end|>\n, and the eos token once at the end of a conversation without a generation prompt.
PHI3 = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% else %}{{ eos_token }}{% endif %}"
)

# Qwen3 style: reasoning of earlier assistant turns is dropped, so the history changes as the chat grows.
REWRITING = (
    "{% for message in messages %}"
    "{% set content = message['content'] %}"
    "{% if message['role'] == 'assistant' and not loop.last %}{% set content = content.split('</think>')[-1] %}"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ content }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class Family:
    name: str
    template: str
    specials: tuple[str, ...]  # added as special tokens
    bos: str | None
    eos: str
    end_of_turn: str  # the token that closes an assistant turn
    adds_bos: bool = False  # the tokenizer itself prepends BOS to plain text (the template must not double it)


FAMILIES = {
    "llama3": Family("llama3", LLAMA3, ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                        "<|end_header_id|>", "<|eot_id|>"),
                     bos="<|begin_of_text|>", eos="<|end_of_text|>", end_of_turn="<|eot_id|>", adds_bos=True),
    "qwen2.5": Family("qwen2.5", QWEN_CHATML, ("<|im_start|>", "<|im_end|>", "<|endoftext|>"),
                      bos=None, eos="<|im_end|>", end_of_turn="<|im_end|>"),
    "gemma": Family("gemma", GEMMA, ("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"),
                    bos="<bos>", eos="<eos>", end_of_turn="<end_of_turn>", adds_bos=True),
    "mistral": Family("mistral", MISTRAL, ("<s>", "</s>"), bos="<s>", eos="</s>", end_of_turn="</s>",
                      adds_bos=True),
    "phi3": Family("phi3", PHI3, ("<|endoftext|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"),
                   bos=None, eos="<|endoftext|>", end_of_turn="<|end|>"),
}


def family_tokenizer(base: Any, family: Family, template: str | None = None) -> Any:
    """A copy of ``base`` with the family's special tokens, bos/eos and chat template."""
    from tokenizers import AddedToken, processors

    tokenizer = copy.deepcopy(base)
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in family.specials],
                         special_tokens=True)
    tokenizer.eos_token = family.eos
    tokenizer.bos_token = family.bos
    tokenizer.pad_token = family.eos
    if family.adds_bos:
        assert family.bos is not None
        bos_id = tokenizer.convert_tokens_to_ids(family.bos)
        tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{family.bos} $A", pair=f"{family.bos} $A {family.bos} $B", special_tokens=[(family.bos, bos_id)])
    tokenizer.chat_template = template or family.template
    return tokenizer
