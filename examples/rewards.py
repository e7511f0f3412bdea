"""Reward functions for examples/grpo_lora.yaml, named there as `_target_: examples.rewards.<function>`.

GRPO calls each with keyword arguments: `prompts` and `completions` (lists of turns, the reply as
`completion[0]["content"]`), `completion_ids`, TRL's `trainer_state`, `log_extra` and
`log_metric`, and every dataset column as a list, here `answer` from the rows of
examples/quickstart/train.jsonl. Each returns one float per completion.
"""

from __future__ import annotations


def matches_answer(completions: list[list[dict[str, str]]], answer: list[str], **kwargs: object) -> list[float]:
    """1.0 when the reply is the row's reference `answer`, else 0.0."""
    return [float(completion[0]["content"].strip() == reference.strip()) for completion, reference in zip(completions, answer)]


def digits_only(completions: list[list[dict[str, str]]], **kwargs: object) -> list[float]:
    """The share of the reply's characters that are digits: a signal while exact answers are still rare."""
    texts = [completion[0]["content"].strip() for completion in completions]
    return [sum(char.isdigit() for char in text) / len(text) if text else 0.0 for text in texts]
