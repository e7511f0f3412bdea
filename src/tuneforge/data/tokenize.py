"""Tokenise and mask: pure functions from text to `input_ids` and `labels`.

Labels are -100 exactly where no loss is wanted (the prompt; padding is masked later by
position in the collator, never by token id, so pad == eos stays safe).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

IGNORE_INDEX = -100


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """Prompt ids as generation will see them: with the tokenizer's own special prefix (BOS)."""
    ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    # Some tokenizer configs append EOS to every encode; a prompt must not end the sequence.
    if ids and tokenizer.eos_token_id is not None and ids[-1] == tokenizer.eos_token_id:
        if tokenizer.eos_token_id != tokenizer.bos_token_id or len(ids) > 1:
            ids = ids[:-1]
    return ids


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False


def build_instruction_example(
    tokenizer: Any, prompt: str, response: str, max_length: int
) -> Example | None:
    """Prompt + response + EOS, loss on the response and EOS only.

    The prompt and response are tokenised separately so the training prompt's ids equal the
    ids `generate` builds from the same prompt.

    Returns:
        The example, or None when the prompt alone leaves no room for a trained token.
    """
    prompt_ids = encode_prompt(tokenizer, prompt)
    response_ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        response_ids.append(tokenizer.eos_token_id)
    if len(prompt_ids) >= max_length or not response_ids:
        return None
    room = max_length - len(prompt_ids)
    truncated = len(response_ids) > room
    response_ids = response_ids[:room]
    return Example(
        input_ids=prompt_ids + response_ids,
        labels=[IGNORE_INDEX] * len(prompt_ids) + response_ids,
        truncated=truncated,
    )


def pack_documents(tokenizer: Any, documents: list[str], block_size: int) -> list[Example]:
    """Continued pretraining: documents + EOS, concatenated and cut into `block_size` blocks.

    Every token is trained on. The final partial block is kept (the collator pads it).
    """
    stream: list[int] = []
    for text in documents:
        stream.extend(tokenizer(text, add_special_tokens=True)["input_ids"])
        if tokenizer.eos_token_id is not None:
            stream.append(tokenizer.eos_token_id)
    blocks = [stream[start : start + block_size] for start in range(0, len(stream), block_size)]
    return [Example(block, list(block)) for block in blocks if len(block) > 1]


__all__ = ["IGNORE_INDEX", "Example", "build_instruction_example", "encode_prompt", "pack_documents"]
