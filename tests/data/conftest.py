"""Tokenizers for template tests, each its own instance (tests must not mutate a shared one).

Built from the byte-level BPE of `tests/conftest.py` (BOS added on encode, no pad).
"""

from __future__ import annotations

from typing import Any

import pytest

CHATML_MARKERS = ["<|im_start|>", "<|im_end|>"]
LLAMA3_MARKERS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

# The usual ChatML chat template, behind `{{ bos_token }}` as Llama-family templates start.
# Together with a tokenizer that also adds BOS on encode, this is the doubled-BOS trap
# (PITFALLS 2); the newline after `<|im_end|>` must not be trained.
CHATML_JINJA = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _load(tokenizer_dir) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


@pytest.fixture(scope="session")
def chat_tokenizer(tokenizer_dir):
    """ChatML and Llama-3 special tokens, and a ChatML Jinja `chat_template` with BOS."""
    tokenizer = _load(tokenizer_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": CHATML_MARKERS + LLAMA3_MARKERS})
    tokenizer.chat_template = CHATML_JINJA
    return tokenizer


@pytest.fixture(scope="session")
def pad_eos_tokenizer(tokenizer_dir):
    """pad == eos, as many setups do for models shipped without a pad token."""
    tokenizer = _load(tokenizer_dir)
    tokenizer.pad_token = tokenizer.eos_token
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    return tokenizer


@pytest.fixture(scope="session")
def no_bos_tokenizer(tokenizer_dir):
    """Encodes without a BOS (as Qwen and GPT-2 tokenizers do)."""
    from tokenizers import processors

    tokenizer = _load(tokenizer_dir)
    tokenizer.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    assert tokenizer("a")["input_ids"][0] != tokenizer.bos_token_id
    return tokenizer


def expected_encoding(tokenizer: Any, parts: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """Ids and labels built independently, piece by piece: `(text, trained)` pairs."""
    input_ids: list[int] = []
    labels: list[int] = []
    for text, trained in parts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        input_ids += ids
        labels += ids if trained else [-100] * len(ids)
    return input_ids, labels


def conversation(*turns: str, system: str | None = None) -> list[dict[str, str]]:
    """Alternating user/assistant messages, optionally after a system message."""
    messages = [{"role": "system", "content": system}] if system is not None else []
    roles = ("user", "assistant")
    return messages + [{"role": roles[i % 2], "content": text} for i, text in enumerate(turns)]
