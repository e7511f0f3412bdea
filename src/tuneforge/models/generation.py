"""Generate continuations of already-encoded prompts (encoding belongs to the data templates)."""

from __future__ import annotations

from typing import Any

import torch


def _images(pixel_values: list[torch.Tensor] | None, start: int, size: int, device: Any) -> dict[str, torch.Tensor]:
    """The batch's images as `generate` keywords (none for a text-only model)."""
    if pixel_values is None:
        return {}
    return {"pixel_values": torch.cat(pixel_values[start : start + size]).to(device)}


@torch.no_grad()
def generate_texts(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt_ids: list[list[int]],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    repetition_penalty: float = 1.0,
    stop_token_ids: list[int] | None = None,
    pixel_values: list[torch.Tensor] | None = None,
    batch_size: int | None = None,
    streamer: Any = None,
) -> list[str]:
    """Decode a continuation per prompt (greedy when `temperature` is 0), stopping at EOS.

    A vision-language model takes `pixel_values`: one tensor per prompt, its images in
    placeholder order.

    Prompts arrive as ids, encoded by the same template code as training, and are
    left-padded into batches of `batch_size` (all at once when None). A `streamer`
    (transformers' `TextStreamer`) receives the tokens as they are generated; streamers
    handle one sequence, so it needs a single prompt.
    """
    if streamer is not None and len(prompt_ids) != 1:
        raise ValueError(f"a streamer takes one prompt at a time, got {len(prompt_ids)}")
    size = batch_size or len(prompt_ids)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    sampling: dict[str, Any] = {"do_sample": temperature > 0}
    if temperature > 0:
        sampling.update(temperature=temperature, top_p=top_p, top_k=top_k)
    was_training = model.training
    model.eval()
    texts: list[str] = []
    for start in range(0, len(prompt_ids), size):
        encoded = prompt_ids[start : start + size]
        width = max(len(ids) for ids in encoded)
        input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in encoded])
        attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded])
        output = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=max_new_tokens,
            repetition_penalty=repetition_penalty,
            pad_token_id=pad_id,
            eos_token_id=stop_token_ids or tokenizer.eos_token_id,
            streamer=streamer,
            **sampling,
            **_images(pixel_values, start, size, device),
        )
        texts += [tokenizer.decode(row[width:], skip_special_tokens=True) for row in output]
    model.train(was_training)
    return texts


__all__ = ["generate_texts"]
