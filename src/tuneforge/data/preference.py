"""Preference data for TRL's trainers, tokenised with the run's template.

    datasets = build_preference_datasets(config.data, tokenizer, seed=0, method=config.method)
    datasets.train[0]  # {"prompt_ids": [...], "chosen_ids": [...], "rejected_ids": [...]}

The prompt is encoded exactly as generation encodes it (`encode_generation_prompt`), and each
reply exactly as supervised training encodes it (`encode_conversation`: through the end-of-turn
token, nothing after it), so a preference-tuned model is prompted the same way it was trained.
Replies are scored, prompts are not (TRL's completion mask). The dataset's `on_too_long` applies
to prompt + reply: `truncate` cuts the reply's end, `drop` drops the pair; a pair whose reply
would be cut away entirely is dropped either way.

Columns are TRL's pre-tokenised ones: `prompt_ids`/`chosen_ids`/`rejected_ids` for pairs,
`prompt_ids`/`completion_ids`/`label` for unpaired replies (KTO), where a pair gives one
desirable and one undesirable reply (as TRL's `unpair_preference_dataset`).

Like supervised data, the result goes through the tokenisation cache (`cached_datasets`).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any, Literal

from datasets import Dataset

from tuneforge.config.schema import DataConfig, DatasetSpec, KtoMethod, PreferenceMethod
from tuneforge.data.build import (
    Datasets,
    DatasetStats,
    _hold_out,
    _resolve,
    _template_for,
    cached_datasets,
    mix,
)
from tuneforge.data.formats import Message, parse_preference, parse_unpaired
from tuneforge.data.sources import BadRows, Row, read_rows
from tuneforge.data.templates import (
    IGNORE_INDEX,
    Template,
    encode_conversation,
    encode_generation_prompt,
)
from tuneforge.data.tokenize import fit_length
from tuneforge.errors import ConfigError, DataError


@dataclass(frozen=True)
class PairExample:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


@dataclass(frozen=True)
class UnpairedExample:
    prompt_ids: list[int]
    completion_ids: list[int]
    label: bool


# What each method reads: pairs (dpo, orpo, simpo) or unpaired replies (kto).
Shape = Literal["pairs", "unpaired"]


def preference_shape(method: PreferenceMethod) -> Shape:
    return "unpaired" if isinstance(method, KtoMethod) else "pairs"


@dataclass(frozen=True)
class _Reply:
    completion_ids: list[int]
    outcome: str  # fit_length's: ok, truncated or dropped


def encode_reply(
    tokenizer: Any, template: Template, prompt: list[Message], reply: list[Message], prompt_ids: list[int],
    max_length: int, spec: DatasetSpec, origin: str,
) -> _Reply:
    """The reply's ids after `prompt_ids`, through its last end-of-turn token, length policy applied."""
    input_ids, labels = encode_conversation(
        tokenizer, template, [*prompt, *reply], train_on="last_assistant", origin=origin
    )
    if input_ids[: len(prompt_ids)] != prompt_ids:
        raise DataError(
            f"template '{template.name}' renders the prompt differently once a reply follows, so "
            "the pair would be trained on a prompt generation never sees",
            where=origin,
        )
    # What a template prints after the end-of-turn token (a newline) is not part of the reply.
    end = len(labels) - next(i for i, label in enumerate(reversed(labels)) if label != IGNORE_INDEX)
    scored = [IGNORE_INDEX] * len(prompt_ids) + input_ids[len(prompt_ids) : end]
    fitted = fit_length(input_ids[:end], scored, max_length, spec.on_too_long)  # type: ignore[arg-type]
    if not fitted.examples:
        return _Reply([], "dropped")
    return _Reply(fitted.examples[0].input_ids[len(prompt_ids) :], fitted.outcome)


def _encode_row(
    row: Row, spec: DatasetSpec, tokenizer: Any, template: Template, max_length: int, unpaired: bool
) -> tuple[list[PairExample | UnpairedExample], list[_Reply]]:
    if spec.format == "unpaired":
        item = parse_unpaired(row, spec)
        prompt, replies, labels = item.prompt, [item.reply], [item.desirable]
    else:
        pair = parse_preference(row, spec)
        prompt, replies, labels = pair.prompt, [pair.chosen, pair.rejected], [True, False]
    prompt_ids = encode_generation_prompt(tokenizer, template, prompt)
    encoded = [
        encode_reply(tokenizer, template, prompt, reply, prompt_ids, max_length, spec, row.origin) for reply in replies
    ]
    if any(reply.outcome == "dropped" for reply in encoded):
        return [], encoded
    if unpaired:
        return [UnpairedExample(prompt_ids, r.completion_ids, label) for r, label in zip(encoded, labels)], encoded
    return [PairExample(prompt_ids, encoded[0].completion_ids, encoded[1].completion_ids)], encoded


def tokenize_preference_dataset(
    spec: DatasetSpec, tokenizer: Any, template: Template, max_length: int, key: str, on_bad_rows: str, unpaired: bool
) -> tuple[list[PairExample | UnpairedExample], DatasetStats]:
    """Read one preference (or unpaired) dataset and tokenise it; bad rows as `on_bad_rows` says."""
    if spec.on_too_long == "split":
        raise ConfigError(
            "on_too_long: split would cut a preference pair into windows that are no longer replies",
            where=f"{key}.on_too_long",
            hint="use truncate (cut the reply's end) or drop",
        )
    bad_rows = BadRows(skip=on_bad_rows == "skip")
    rows = read_rows(spec, key, bad_rows)
    stats = DatasetStats(name=spec.name, rows=len(rows) + bad_rows.count)
    examples: list[PairExample | UnpairedExample] = []
    for row in rows:
        try:
            row_examples, replies = _encode_row(row, spec, tokenizer, template, max_length, unpaired)
        except DataError as error:
            bad_rows.handle(error)
            continue
        stats.dropped += not row_examples
        stats.truncated += any(reply.outcome == "truncated" for reply in replies) and bool(row_examples)
        examples.extend(row_examples)
    stats.bad_rows, stats.bad_reasons = bad_rows.count, bad_rows.reasons
    stats.examples = stats.used = len(examples)
    for example in examples:
        completions = (
            [example.completion_ids] if isinstance(example, UnpairedExample) else [example.chosen_ids, example.rejected_ids]
        )
        stats.lengths.append(len(example.prompt_ids) + max(map(len, completions)))
        stats.tokens += sum(len(example.prompt_ids) + len(c) for c in completions)
        stats.trained_tokens += sum(map(len, completions))
    if not examples:
        raise DataError(
            f"no usable preference examples out of {stats.rows} rows ({stats.dropped} too long, {stats.bad_rows} bad)",
            where=spec.name,
            hint="raise data.max_length, or check prompt_fields, chosen_field and rejected_field",
        )
    return examples, stats


def _to_dataset(examples: list[PairExample | UnpairedExample]) -> Dataset:
    return Dataset.from_list([asdict(example) for example in examples])


def build_preference_datasets(
    config: DataConfig, tokenizer: Any, seed: int, *, method: PreferenceMethod, use_cache: bool = True,
    peers_wait: bool = False, wait_seconds: float | None = None,
) -> Datasets:
    """Train and eval sets of what `method` reads (pairs, or unpaired replies for KTO) with per-dataset statistics.

    `eval_split`, mixture weights and `eval_datasets` work as for supervised data (`build_datasets`);
    pairs are held out whole. Cached, and shared between processes, as `build_datasets` does.
    """
    if config.packing or config.streaming:
        raise ConfigError(
            "preference data is neither packed nor streamed: the trainer scores whole replies side by side",
            where="data.packing" if config.packing else "data.streaming",
            hint="set it to false",
        )
    template = _resolve(config.datasets[0], tokenizer, "data.datasets.0")
    shape = preference_shape(method)
    return cached_datasets(
        config, tokenizer, seed, template, lambda: _tokenize_all(config, tokenizer, seed, template, shape),
        extra=f"preference:{shape}", use_cache=use_cache, peers_wait=peers_wait, wait_seconds=wait_seconds,
    )


def _tokenize_all(config: DataConfig, tokenizer: Any, seed: int, template: Template, shape: Shape) -> Datasets:
    unpaired = shape == "unpaired"
    parts, stats = [], []
    eval_examples: list[PairExample | UnpairedExample] = []
    for index, spec in enumerate(config.datasets):
        key = f"data.datasets.{index}"
        examples, stat = tokenize_preference_dataset(
            spec, tokenizer, _template_for(spec, template, tokenizer, key), config.max_length, key,
            config.on_bad_rows, unpaired,
        )
        if not config.eval_datasets:
            examples, held_out = _hold_out(examples, config.eval_split, seed + index)  # type: ignore[arg-type]
            eval_examples.extend(held_out)
        parts.append(examples)
        stats.append(stat)
    parts = mix(parts, config.datasets, seed)  # type: ignore[arg-type]
    for part, stat in zip(parts, stats):
        stat.used = len(part)
    for index, spec in enumerate(config.eval_datasets):
        key = f"data.eval_datasets.{index}"
        examples, stat = tokenize_preference_dataset(
            spec, tokenizer, _template_for(spec, template, tokenizer, key), config.max_length, key,
            config.on_bad_rows, unpaired,
        )
        stat.name = f"{stat.name} (eval)"
        eval_examples.extend(examples)
        stats.append(stat)
    train = [example for part in parts for example in part]
    if unpaired:
        # KTO reads examples in order (its KL term pairs neighbours): shuffle once, so a batch
        # is not all one dataset, or one pair's desirable and undesirable reply side by side.
        random.Random(seed).shuffle(train)
    return Datasets(
        train=_to_dataset(train),
        eval=_to_dataset(eval_examples) if eval_examples else None,
        stats=stats,
        template=template,
    )


__all__ = [
    "PairExample",
    "UnpairedExample",
    "build_preference_datasets",
    "encode_reply",
    "preference_shape",
    "tokenize_preference_dataset",
]
