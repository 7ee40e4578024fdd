"""Byte-level BPE tokenizer training, wrapped as a ``transformers`` fast tokenizer with a chat template.

Special tokens (ids 0..6, in this order): ``<|bos|>``, ``<|eos|>``, ``<|pad|>``, and the chat
markers ``<|system|>``, ``<|user|>``, ``<|assistant|>``, ``<|end|>``. Plain ``tokenizer(text)``
adds no special tokens; packing joins documents with ``<|eos|>`` and the chat template adds
``<|bos|>`` itself. A conversation renders as::

    <|bos|><|system|>SYSTEM<|end|><|user|>QUESTION<|end|><|assistant|>ANSWER<|eos|>

so a model trained on it stops generating by emitting ``<|eos|>``. Every message boundary sits
next to a special token, which is why per-message encodings concatenate to the encoding of the
whole conversation (instruction masking relies on it).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from typing import Any

from llmstack.errors import ConfigError, DataError

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS = (BOS, EOS, PAD, SYSTEM, USER, ASSISTANT, END)
ROLES = ("system", "user", "assistant")
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # the 256 byte symbols plus the specials

# Jinja chat template (used by tokenizer.apply_chat_template). Non-assistant turns close with
# <|end|>; assistant turns close with the eos token so generation stops there. The
# {% generation %} markers let transformers return an assistant-token mask too.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "<|assistant|>{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}"
    "{% elif message['role'] in ['system', 'user'] %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{% else %}"
    "{{ raise_exception('unknown chat role: ' ~ message['role'] ~ ' (allowed: system, user, assistant)') }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _as_list(documents: Iterable[str] | Any) -> list[str]:
    docs = getattr(documents, "documents", documents)  # a Corpus works too
    if isinstance(docs, str):
        raise DataError("train_tokenizer expects a sequence of documents, got a single string")
    out = list(docs)
    bad = next((i for i, d in enumerate(out) if not isinstance(d, str)), None)
    if bad is not None:
        raise DataError(f"train_tokenizer: document {bad} is a {type(out[bad]).__name__}, expected a string")
    if not any(d.strip() for d in out):
        raise DataError("train_tokenizer: no non-blank documents to train on")
    return out


def train_tokenizer(documents: Iterable[str] | Any, *, vocab_size: int = 4096, min_frequency: int = 2,
                    model_max_length: int | None = None) -> Any:
    """Train a byte-level BPE tokenizer and wrap it as a ``PreTrainedTokenizerFast``.

    Deterministic: the same documents (in the same order) and settings give the same vocabulary.

    Args:
        documents: the training texts (a list of strings or a :class:`~llmstack.data.Corpus`).
        vocab_size: the final vocabulary size, special tokens included (>= 263).
        min_frequency: a pair must occur this often to be merged.
        model_max_length: recorded on the tokenizer (None: unlimited).

    Returns:
        A fast tokenizer with bos/eos/pad set and :data:`CHAT_TEMPLATE` as its chat template.

    Example:
        >>> tok = train_tokenizer(["hello world"] * 10, vocab_size=300)
        >>> tok.decode(tok("hello world")["input_ids"])
        'hello world'
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise ConfigError(f"vocab_size: must be an integer >= {MIN_VOCAB_SIZE} (256 bytes + "
                          f"{len(SPECIAL_TOKENS)} special tokens), got {vocab_size!r}")
    docs = _as_list(documents)
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(docs, trainer=trainer, length=len(docs))
    return wrap_tokenizer(backend, model_max_length=model_max_length)


def wrap_tokenizer(backend: Any, *, model_max_length: int | None = None) -> Any:
    """Wrap a ``tokenizers.Tokenizer`` holding our special tokens as a configured fast tokenizer."""
    from transformers import PreTrainedTokenizerFast

    missing = [t for t in SPECIAL_TOKENS if backend.token_to_id(t) is None]
    if missing:
        raise DataError(f"tokenizer lacks the special tokens {', '.join(missing)}")
    kwargs: dict[str, Any] = {}
    if model_max_length is not None:
        kwargs["model_max_length"] = model_max_length
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        additional_special_tokens=[SYSTEM, USER, ASSISTANT, END], clean_up_tokenization_spaces=False,
        padding_side="right", **kwargs)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 over the tokenizer's vocabulary, merges, specials and chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise DataError(f"expected a fast tokenizer, got {type(tokenizer).__name__}")
    state = json.loads(backend.to_str())
    payload = {"model": state.get("model"), "added": [(t["id"], t["content"]) for t in state.get("added_tokens", [])],
               "pre": state.get("pre_tokenizer"), "chat_template": getattr(tokenizer, "chat_template", None),
               "special": [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    """Validate a chat ``messages`` list; DataError (naming ``where``) if malformed or without an answer."""
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    out: list[dict[str, str]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{where}: message {i} must be an object with 'role' and 'content'")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise DataError(f"{where}: message {i} has role {role!r}; allowed: {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"{where}: message {i} content is a {type(content).__name__}, expected a string")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in out):
        raise DataError(f"{where}: the conversation has no assistant response (nothing to learn from)")
    return out
