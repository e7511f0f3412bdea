"""Preference data for TRL's trainers, tokenised with the run's template.

    datasets = build_preference_datasets(config.data, tokenizer, seed=0, method=config.method)
    datasets.train[0]  # {"prompt_ids": [...], "chosen_ids": [...], "rejected_ids": [...]}

The prompt is encoded exactly as generation encodes it (`encode_generation_prompt`), and each
reply exactly as supervised training encodes it (`encode_conversation`: through the end-of-turn
token, nothing after it), so a preference-tuned model is prompted the same way it was trained.
Replies are scored, prompts are not (TRL's completion mask). The dataset's `on_too_long` applies
to prompt + reply: `truncate` cuts the reply's end, `drop` drops the pair; a pair whose reply
would be cut away entirely is dropped either way.

Columns are TRL's pre-tokenised ones, by method: `prompt_ids`/`chosen_ids`/`rejected_ids` for
pairs (dpo, orpo, simpo); `prompt_ids`/`completion_ids`/`label` for unpaired replies (kto), where
a pair gives one desirable and one undesirable reply (as TRL's `unpair_preference_dataset`). GRPO
reads prompts alone (`format: prompt`): `prompt` is the conversation in TRL's conversational form
(the trainer renders it with the run's template, giving `prompt_ids`), and the row's other fields
are columns too, which TRL hands to the reward functions. A prompt longer than `data.max_length`
minus `max_completion_length` is dropped: cutting it would cut the turn the model replies to.

Like supervised data, the result goes through the tokenisation cache (`cached_datasets`).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any, Literal

import pyarrow
from datasets import Dataset

from tuneforge.config.schema import (
    DataConfig,
    DatasetSpec,
    GrpoMethod,
    KtoMethod,
    PreferenceMethod,
)
from tuneforge.data.build import (
    Datasets,
    DatasetStats,
    _hold_out,
    _resolve,
    _template_for,
    cached_datasets,
    mix,
)
from tuneforge.data.formats import (
    Message,
    parse_preference,
    parse_prompt,
    parse_unpaired,
)
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


@dataclass(frozen=True)
class PromptExample:
    prompt_ids: list[int]
    prompt: list[Message]
    columns: dict[str, Any]  # the row's other fields, for the reward functions


Example = PairExample | UnpairedExample | PromptExample
# What each method reads: pairs (dpo, orpo, simpo), unpaired replies (kto), prompts (grpo).
Shape = Literal["pairs", "unpaired", "prompts"]

# Names TRL's GRPO gives its reward functions itself, or reads as images: a row field of one of
# these names would be overwritten or misread, so it is refused.
REWARD_KEYWORDS = frozenset({
    "prompt", "prompt_ids", "prompts", "completion", "completions", "completion_ids", "trainer_state",
    "log_extra", "log_metric", "environments", "image", "images",
})


def preference_shape(method: PreferenceMethod) -> Shape:
    if isinstance(method, KtoMethod):
        return "unpaired"
    return "prompts" if isinstance(method, GrpoMethod) else "pairs"


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


def _columns(row: Row, spec: DatasetSpec) -> dict[str, Any]:
    """The row's fields but the `prompt` the conversation replaces, for the reward functions."""
    columns = {name: value for name, value in row.fields.items() if not (name == "prompt" and name in spec.prompt_field_names)}
    clashes = sorted(REWARD_KEYWORDS & set(columns))
    if clashes:
        raise DataError(
            f"field(s) {', '.join(clashes)} would reach the reward functions under names GRPO gives them itself "
            f"({', '.join(sorted(REWARD_KEYWORDS))})",
            where=row.origin,
            hint="rename the field(s) in the data, or name them in prompt_fields if they hold the prompt",
        )
    return columns


def _encode_row(
    row: Row, spec: DatasetSpec, tokenizer: Any, template: Template, max_length: int, shape: Shape
) -> tuple[list[Example], list[str]]:
    """The row's examples and the outcome of fitting each part (fit_length's: ok, truncated or dropped)."""
    if shape == "prompts":
        prompt = parse_prompt(row, spec)
        prompt_ids = encode_generation_prompt(tokenizer, template, prompt)
        if len(prompt_ids) > max_length:
            return [], ["dropped"]
        return [PromptExample(prompt_ids, prompt, _columns(row, spec))], ["ok"]
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
    outcomes = [reply.outcome for reply in encoded]
    if "dropped" in outcomes:
        return [], outcomes
    if shape == "unpaired":
        return [UnpairedExample(prompt_ids, r.completion_ids, label) for r, label in zip(encoded, labels)], outcomes
    return [PairExample(prompt_ids, encoded[0].completion_ids, encoded[1].completion_ids)], outcomes


def _completions(example: Example) -> list[list[int]]:
    if isinstance(example, PairExample):
        return [example.chosen_ids, example.rejected_ids]
    return [example.completion_ids] if isinstance(example, UnpairedExample) else []


def tokenize_preference_dataset(
    spec: DatasetSpec, tokenizer: Any, template: Template, max_length: int, key: str, on_bad_rows: str, shape: Shape
) -> tuple[list[Example], DatasetStats]:
    """Read one preference, unpaired or prompt dataset and tokenise it; bad rows as `on_bad_rows` says.

    `max_length` bounds prompt + reply, or for prompts (GRPO) the prompt alone.
    """
    if spec.on_too_long == "split":
        raise ConfigError(
            "on_too_long: split would cut a preference pair or prompt into windows that are no longer one",
            where=f"{key}.on_too_long",
            hint="use truncate (cut the reply's end) or drop",
        )
    bad_rows = BadRows(skip=on_bad_rows == "skip")
    rows = read_rows(spec, key, bad_rows)
    stats = DatasetStats(name=spec.name, rows=len(rows) + bad_rows.count)
    examples: list[Example] = []
    for row in rows:
        try:
            row_examples, outcomes = _encode_row(row, spec, tokenizer, template, max_length, shape)
        except DataError as error:
            bad_rows.handle(error)
            continue
        stats.dropped += not row_examples
        stats.truncated += "truncated" in outcomes and bool(row_examples)
        examples.extend(row_examples)
    stats.bad_rows, stats.bad_reasons = bad_rows.count, bad_rows.reasons
    stats.examples = stats.used = len(examples)
    for example in examples:
        completions = _completions(example)
        stats.lengths.append(len(example.prompt_ids) + max(map(len, completions), default=0))
        # The prompt is processed once per reply (once alone for GRPO, which generates the replies).
        stats.tokens += len(example.prompt_ids) * max(1, len(completions)) + sum(map(len, completions))
        stats.trained_tokens += sum(map(len, completions))
    if not examples:
        raise DataError(
            f"no usable preference examples out of {stats.rows} rows ({stats.dropped} too long, {stats.bad_rows} bad)",
            where=spec.name,
            hint="raise data.max_length (GRPO prompts get data.max_length - method.max_completion_length), or check "
            "prompt_fields" + ("" if shape == "prompts" else ", chosen_field and rejected_field"),
        )
    return examples, stats


def _record(example: Example) -> dict[str, Any]:
    if isinstance(example, PromptExample):
        return {"prompt_ids": example.prompt_ids, "prompt": example.prompt, **example.columns}
    return asdict(example)


def _to_dataset(examples: list[Example]) -> Dataset:
    records = [_record(example) for example in examples]
    # Rows may differ in their fields (GRPO columns): every field is a column, None where a row lacks it.
    names = list(dict.fromkeys(name for record in records for name in record))
    columns = {name: [record.get(name) for record in records] for name in names}
    try:
        return Dataset.from_dict(columns)
    except (pyarrow.ArrowInvalid, pyarrow.ArrowTypeError) as error:
        # Arrow does not say which column failed: find it.
        name = next((name for name, values in columns.items() if not _is_column(values)), None)
        raise DataError(
            f"field '{name}' differs in type between rows: {error}" if name else f"the rows do not form a table: {error}",
            where="data",
            hint="give each field the same type in every row (e.g. always text, or always a list)",
        ) from None


def _is_column(values: list[Any]) -> bool:
    try:
        pyarrow.array(values)
    except (pyarrow.ArrowInvalid, pyarrow.ArrowTypeError):
        return False
    return True


def _length_budget(config: DataConfig, method: PreferenceMethod) -> int:
    """Tokens for prompt + reply, or for a GRPO prompt: what generation leaves of `data.max_length`."""
    if not isinstance(method, GrpoMethod):
        return config.max_length
    budget = config.max_length - method.max_completion_length
    if budget < 1:
        raise ConfigError(
            f"max_completion_length {method.max_completion_length} leaves no room for a prompt within "
            f"data.max_length {config.max_length}",
            where="method.max_completion_length",
            hint="raise data.max_length above the longest prompt plus max_completion_length, or lower max_completion_length",
        )
    return budget


def build_preference_datasets(
    config: DataConfig, tokenizer: Any, seed: int, *, method: PreferenceMethod, use_cache: bool = True,
    peers_wait: bool = False, wait_seconds: float | None = None,
) -> Datasets:
    """Train and eval sets of what `method` reads (pairs, unpaired replies or prompts) with per-dataset statistics.

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
    shape, max_length = preference_shape(method), _length_budget(config, method)
    return cached_datasets(
        config, tokenizer, seed, template, lambda: _tokenize_all(config, tokenizer, seed, template, shape, max_length),
        extra=f"preference:{shape}:{max_length}", use_cache=use_cache, peers_wait=peers_wait, wait_seconds=wait_seconds,
    )


def _tokenize_all(
    config: DataConfig, tokenizer: Any, seed: int, template: Template, shape: Shape, max_length: int
) -> Datasets:
    parts, stats = [], []
    eval_examples: list[Example] = []
    for index, spec in enumerate(config.datasets):
        key = f"data.datasets.{index}"
        examples, stat = tokenize_preference_dataset(
            spec, tokenizer, _template_for(spec, template, tokenizer, key), max_length, key, config.on_bad_rows, shape,
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
            spec, tokenizer, _template_for(spec, template, tokenizer, key), max_length, key, config.on_bad_rows, shape,
        )
        stat.name = f"{stat.name} (eval)"
        eval_examples.extend(examples)
        stats.append(stat)
    train = [example for part in parts for example in part]
    if shape == "unpaired":
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
    "REWARD_KEYWORDS",
    "PairExample",
    "PromptExample",
    "UnpairedExample",
    "build_preference_datasets",
    "encode_reply",
    "preference_shape",
    "tokenize_preference_dataset",
]
