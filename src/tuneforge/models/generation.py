"""Generate continuations for formatted prompts, with the same prompt encoding as training."""

from __future__ import annotations

from typing import Any

import torch

from tuneforge.data.tokenize import encode_prompt


@torch.no_grad()
def generate_texts(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: list[str],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    repetition_penalty: float = 1.0,
) -> list[str]:
    """Decode a continuation per prompt (greedy when `temperature` is 0), stopping at EOS.

    Prompts are encoded one by one with `encode_prompt`, exactly as training encoded them,
    and left-padded into one batch.
    """
    encoded = [encode_prompt(tokenizer, prompt) for prompt in prompts]
    width = max(len(ids) for ids in encoded)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in encoded])
    attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded])
    device = next(model.parameters()).device
    sampling: dict[str, Any] = {"do_sample": temperature > 0}
    if temperature > 0:
        sampling.update(temperature=temperature, top_p=top_p, top_k=top_k)
    was_training = model.training
    model.eval()
    output = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        max_new_tokens=max_new_tokens,
        repetition_penalty=repetition_penalty,
        pad_token_id=pad_id,
        eos_token_id=tokenizer.eos_token_id,
        **sampling,
    )
    model.train(was_training)
    return [tokenizer.decode(row[width:], skip_special_tokens=True) for row in output]


__all__ = ["generate_texts"]
