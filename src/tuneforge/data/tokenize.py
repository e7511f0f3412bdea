"""Tokenise and mask rows, and apply the length policy: pure functions from rows to examples.

    encoded = encode_row(row, spec, tokenizer, template, max_length=1024)
    encoded.outcome  # "ok", "truncated", "split" or "dropped" (counted in the report)

Labels are -100 exactly where no loss is wanted. Padding is masked later by position in the
collator, never by token id, so pad == eos keeps every terminator's label (PITFALLS 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from tuneforge.config.schema import DatasetSpec
from tuneforge.data.formats import row_to_messages
from tuneforge.data.sources import Row
from tuneforge.data.templates import IGNORE_INDEX, Template, encode_conversation

Outcome = Literal["ok", "truncated", "split", "dropped"]
OnTooLong = Literal["truncate", "drop", "split"]


@dataclass(frozen=True)
class Example:
    """One training sequence; `labels[i]` is -100 where position i is not trained."""

    input_ids: list[int]
    labels: list[int]


def example_columns(examples: Sequence[Example]) -> dict[str, list[list[Any]]]:
    """The examples as dataset columns, one per field (`input_ids`, `labels`, then any other).

    Subclasses add per-example lists (an image example's `images`); where only some examples
    have such a field (text examples in a mixture with image ones), the others get `[]`.
    """
    kinds = dict.fromkeys([Example, *(type(e) for e in examples)])  # in order of appearance: stable columns
    names = dict.fromkeys(f.name for kind in kinds for f in fields(kind))
    return {name: [list(getattr(e, name, ())) for e in examples] for name in names}


@dataclass(frozen=True)
class Encoded:
    """What one row became: its examples (none when dropped) and how the length policy went."""

    examples: list[Example] = field(default_factory=list)
    outcome: Outcome = "ok"


def has_trained_token(labels: list[int]) -> bool:
    """Whether any label contributes to the loss.

    The model predicts token i from tokens before it, so the first label of a sequence never
    counts: a window whose only trained token is its first would give a zero (or NaN) loss.
    """
    return any(label != IGNORE_INDEX for label in labels[1:])


def fit_length(input_ids: list[int], labels: list[int], max_length: int, on_too_long: OnTooLong) -> Encoded:
    """Apply the length policy to one encoded sequence.

    Args:
        input_ids: Token ids.
        labels: Labels, -100 where not trained.
        max_length: Longest sequence allowed.
        on_too_long: `truncate` (keep the first `max_length` tokens), `drop`, or `split` into
            consecutive windows of `max_length` (windows without a trained token are
            discarded).

    Returns:
        The examples and the outcome. Whatever the policy, a sequence left with no trained
        token is dropped (PITFALLS 4).

    Example:
        labels `[-100, -100, 5, 6, 7]` with `max_length=2`: `truncate` drops the row (its
        first two tokens are untrained); `split` makes windows `[-100, -100]`, `[5, 6]` and
        `[7]` and keeps only `[5, 6]` (a lone first label never counts: `has_trained_token`).
    """
    if len(input_ids) <= max_length:
        if not has_trained_token(labels):
            return Encoded([], "dropped")
        return Encoded([Example(list(input_ids), list(labels))], "ok")
    if on_too_long == "drop":
        return Encoded([], "dropped")
    if on_too_long == "truncate":
        kept = labels[:max_length]
        if not has_trained_token(kept):
            return Encoded([], "dropped")
        return Encoded([Example(input_ids[:max_length], kept)], "truncated")
    windows = [
        Example(input_ids[start : start + max_length], labels[start : start + max_length])
        for start in range(0, len(input_ids), max_length)
    ]
    windows = [window for window in windows if has_trained_token(window.labels)]
    return Encoded(windows, "split") if windows else Encoded([], "dropped")


def encode_row(row: Row, spec: DatasetSpec, tokenizer: Any, template: Template, max_length: int) -> Encoded:
    """Format, template, tokenise and mask one supervised row, then apply `spec.on_too_long`.

    Args:
        row: An `instruction`, `chat` or `multiple_choice` row.
        spec: Its dataset config (format, fields, `train_on`, `on_too_long`).
        tokenizer: The tokenizer.
        template: From `resolve_template`.
        max_length: `data.max_length`.

    Returns:
        The row's examples and outcome.

    Raises:
        DataError: The row does not fit its format, or the template cannot mask it.
    """
    messages = row_to_messages(row, spec)
    input_ids, labels = encode_conversation(
        tokenizer, template, messages, train_on=spec.train_on, origin=row.origin
    )
    return fit_length(input_ids, labels, max_length, spec.on_too_long)


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


__all__ = [
    "IGNORE_INDEX",
    "Encoded",
    "Example",
    "Outcome",
    "encode_row",
    "example_columns",
    "fit_length",
    "has_trained_token",
    "pack_documents",
]
