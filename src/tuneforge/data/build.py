"""Build the training and evaluation datasets from the `data` config section.

    datasets = build_datasets(config.data, tokenizer, seed=config.train.seed)

Per dataset: read rows -> format -> template -> tokenise with loss masks -> length policy.
Then: hold out evaluation examples, mix the datasets by weight or count, pack if asked.
The result is cached on disk, keyed on everything that affects it (see `cache.py`).
"""

from __future__ import annotations

import multiprocessing
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from datasets import Dataset

from tuneforge.config.schema import DataConfig, DatasetSpec
from tuneforge.data.cache import DataCache
from tuneforge.data.formats import document_text
from tuneforge.data.images import VISION_FORMATS, ImageInputs, encode_image_row
from tuneforge.data.packing import PackingStats, build_packed_dataset
from tuneforge.data.sources import BadRows, Row, read_rows
from tuneforge.data.streaming import stream_text_dataset
from tuneforge.data.templates import Template, resolve_template
from tuneforge.data.tokenize import IGNORE_INDEX, Example, encode_row, example_columns, pack_documents
from tuneforge.errors import ConfigError, DataError

# Conversations with a trained reply: the run saves their template for generation.
SUPERVISED_FORMATS = ("instruction", "chat", "multiple_choice", *VISION_FORMATS)


@dataclass
class DatasetStats:
    """What preprocessing did to one dataset; printed before training and by `data preview`."""

    name: str
    rows: int = 0
    examples: int = 0
    used: int = 0
    truncated: int = 0
    dropped: int = 0
    split: int = 0
    bad_rows: int = 0
    bad_reasons: list[str] = field(default_factory=list)
    tokens: int = 0
    trained_tokens: int = 0
    lengths: list[int] = field(default_factory=list, repr=False)

    def describe(self) -> str:
        text = (
            f"{self.name}: {self.rows} rows -> {self.examples} examples, "
            f"{self.tokens} tokens ({self.trained_tokens} trained)"
        )
        if self.used != self.examples:
            text += f"; {self.used} used after mixing"
        counts = [
            f"{self.truncated} truncated" if self.truncated else "",
            f"{self.dropped} dropped (too long)" if self.dropped else "",
            f"{self.split} split into windows" if self.split else "",
            f"{self.bad_rows} bad rows skipped" if self.bad_rows else "",
        ]
        counts = [c for c in counts if c]
        if counts:
            text += "; " + ", ".join(counts)
        for reason in self.bad_reasons:
            text += f"\n    skipped: {reason}"
        return text


@dataclass
class Datasets:
    train: Dataset
    eval: Dataset | None
    stats: list[DatasetStats] = field(default_factory=list)
    template: Template | None = None
    from_cache: bool = False
    packing: PackingStats | None = None
    images: ImageInputs | None = None  # a vision-language model's: the collator reads the images
    # The cache key: data content, tokenizer, template and settings; checkpoints record it so a
    # resume on changed data is caught (None when nothing was cached: streaming, use_cache=False).
    fingerprint: str | None = None


def encode_rows(
    rows: list[Row], spec: DatasetSpec, tokenizer: Any, template: Template, max_length: int, bad_rows: BadRows,
    images: ImageInputs | None = None,
) -> tuple[list[Example], DatasetStats]:
    """Tokenise supervised rows with the length policy; bad rows go to `bad_rows`.

    Rows of the image formats (`llava`, `caption`) need the vision model's `images` inputs.
    """
    stats = DatasetStats(name=spec.name, rows=len(rows))
    examples: list[Example] = []
    for row in rows:
        try:
            if images is not None:
                encoded = encode_image_row(row, spec, tokenizer, template, max_length, images)
            else:
                encoded = encode_row(row, spec, tokenizer, template, max_length)
        except DataError as error:
            bad_rows.handle(error)
            continue
        if encoded.outcome == "truncated":
            stats.truncated += 1
        elif encoded.outcome == "dropped":
            stats.dropped += 1
        elif encoded.outcome == "split":
            stats.split += 1
        examples.extend(encoded.examples)
    return examples, stats


def _encode_shard(args: tuple) -> tuple[list[Example], DatasetStats, BadRows]:
    rows, spec, tokenizer, template, max_length, skip, images = args
    bad_rows = BadRows(skip=skip)
    examples, stats = encode_rows(rows, spec, tokenizer, template, max_length, bad_rows, images)
    return examples, stats, bad_rows


def encode_rows_parallel(
    rows: list[Row], spec: DatasetSpec, tokenizer: Any, template: Template, max_length: int,
    bad_rows: BadRows, num_proc: int, images: ImageInputs | None = None,
) -> tuple[list[Example], DatasetStats]:
    """`encode_rows` over `num_proc` forked workers, results in row order."""
    if num_proc <= 1 or len(rows) < 2 * num_proc:
        return encode_rows(rows, spec, tokenizer, template, max_length, bad_rows, images)
    # Fast tokenizers' own thread pool must not be inherited across fork.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    size = -(-len(rows) // num_proc)
    shards = [
        (rows[i : i + size], spec, tokenizer, template, max_length, bad_rows.skip, images)
        for i in range(0, len(rows), size)
    ]
    with multiprocessing.get_context("fork").Pool(num_proc) as pool:
        results = pool.map(_encode_shard, shards)
    examples: list[Example] = []
    stats = DatasetStats(name=spec.name, rows=len(rows))
    for shard_examples, shard_stats, shard_bad in results:
        examples.extend(shard_examples)
        stats.truncated += shard_stats.truncated
        stats.dropped += shard_stats.dropped
        stats.split += shard_stats.split
        bad_rows.count += shard_bad.count
        bad_rows.reasons.extend(shard_bad.reasons[: 3 - len(bad_rows.reasons)])
    return examples, stats


def tokenize_dataset(
    spec: DatasetSpec, tokenizer: Any, template: Template, max_length: int, key: str,
    on_bad_rows: str = "error", num_proc: int = 1, images: ImageInputs | None = None,
) -> tuple[list[Example], DatasetStats]:
    """Read, format and tokenise one dataset (`images`: the vision model's, for image formats)."""
    if spec.format in VISION_FORMATS and images is None:
        raise ConfigError(
            f"format '{spec.format}' needs a vision-language model",
            where=f"{key}.format",
            hint="set model.vision (a vision tower for the language model), or model.path to a LLaVA checkpoint",
        )
    if spec.format == "preference":
        raise DataError(
            "preference pairs train with a preference method, not supervised fine-tuning",
            where=spec.name,
            hint="use format: instruction or chat for supervised fine-tuning",
        )
    bad_rows = BadRows(skip=on_bad_rows == "skip")
    rows = read_rows(spec, key, bad_rows)
    read_failures = bad_rows.count
    if spec.format == "text":
        documents = []
        for row in rows:
            try:
                documents.append(document_text(row, spec))
            except DataError as error:
                bad_rows.handle(error)
        examples = pack_documents(tokenizer, documents, max_length)
        stats = DatasetStats(name=spec.name, rows=len(rows))
    else:
        examples, stats = encode_rows_parallel(
            rows, spec, tokenizer, template, max_length, bad_rows, num_proc,
            images if spec.format in VISION_FORMATS else None,
        )
    # Rows that could not even be read count as rows too: "6 rows -> 3 examples, 3 bad".
    stats.rows += read_failures
    stats.bad_rows, stats.bad_reasons = bad_rows.count, bad_rows.reasons
    stats.examples = stats.used = len(examples)
    stats.lengths = [len(e.input_ids) for e in examples]
    stats.tokens = sum(stats.lengths)
    stats.trained_tokens = sum(sum(label != IGNORE_INDEX for label in e.labels) for e in examples)
    if not examples:
        raise DataError(
            f"no usable examples out of {stats.rows} rows ({stats.dropped} too long, "
            f"{stats.bad_rows} bad)",
            where=spec.name,
            hint="raise data.max_length, set on_too_long: truncate, or check the field names",
        )
    return examples, stats


def _hold_out(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    if fraction <= 0:
        return examples, []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = max(1, round(len(order) * fraction))
    if held >= len(order):
        raise DataError(
            f"eval_split={fraction} leaves no training examples out of {len(order)}",
            where="data.eval_split",
        )
    held_out = set(order[:held])
    return (
        [e for i, e in enumerate(examples) if i not in held_out],
        [e for i, e in enumerate(examples) if i in held_out],
    )


def _sample(examples: list[Example], count: int, rng: random.Random) -> list[Example]:
    """`count` examples: whole shuffled copies, then a sample of the rest (no repeats within a copy)."""
    copies, remainder = divmod(count, len(examples))
    chosen: list[Example] = []
    for _ in range(copies):
        chosen.extend(rng.sample(examples, len(examples)))
    return chosen + rng.sample(examples, remainder)


def mix(parts: list[list[Example]], specs: list[DatasetSpec], seed: int) -> list[list[Example]]:
    """Apply each dataset's `samples` or `weight`; datasets with neither keep every example.

    Weighted datasets share the total size of the weighted datasets in proportion to their weights.
    """
    weighted = [i for i, spec in enumerate(specs) if spec.weight is not None]
    budget = sum(len(parts[i]) for i in weighted)
    total_weight = sum(specs[i].weight for i in weighted)  # type: ignore[misc]
    mixed = []
    for index, (examples, spec) in enumerate(zip(parts, specs)):
        rng = random.Random(seed * 1000 + index)
        if spec.samples is not None:
            mixed.append(_sample(examples, spec.samples, rng))
        elif spec.weight is not None:
            mixed.append(_sample(examples, max(1, round(budget * spec.weight / total_weight)), rng))
        else:
            mixed.append(examples)
    return mixed


def to_dataset(examples: list[Example]) -> Dataset:
    """One row per example; image examples bring an `images` column of paths, read by the collator."""
    return Dataset.from_dict(example_columns(examples))


def _resolve(spec: DatasetSpec, tokenizer: Any, key: str) -> Template:
    try:
        return resolve_template(spec.template, tokenizer)
    except ConfigError as error:
        raise ConfigError(error.message, where=f"{key}.template={spec.template}", hint=error.hint) from None


def _template_for(spec: DatasetSpec, first: Template, tokenizer: Any, key: str = "data.datasets") -> Template:
    # The run saves the first dataset's template for generation; others may differ on purpose.
    return first if spec.template == first.name else _resolve(spec, tokenizer, key)


def _tokenize_all(
    config: DataConfig, tokenizer: Any, template: Template, seed: int, batch_size: int, images: ImageInputs | None
) -> Datasets:
    train_parts, stats = [], []
    eval_examples: list[Example] = []
    for index, spec in enumerate(config.datasets):
        examples, stat = tokenize_dataset(
            spec, tokenizer, _template_for(spec, template, tokenizer, f"data.datasets.{index}"), config.max_length,
            f"data.datasets.{index}", config.on_bad_rows, config.num_proc, images,
        )
        if not config.eval_datasets:
            examples, held_out = _hold_out(examples, config.eval_split, seed + index)
            eval_examples.extend(held_out)
        train_parts.append(examples)
        stats.append(stat)
    mixed = mix(train_parts, config.datasets, seed)
    for part, stat in zip(mixed, stats):
        stat.used = len(part)
    train_examples = [e for part in mixed for e in part]
    for index, spec in enumerate(config.eval_datasets):
        examples, stat = tokenize_dataset(
            spec, tokenizer, _template_for(spec, template, tokenizer, f"data.eval_datasets.{index}"), config.max_length,
            f"data.eval_datasets.{index}", config.on_bad_rows, config.num_proc, images,
        )
        stat.name = f"{stat.name} (eval)"
        eval_examples.extend(examples)
        stats.append(stat)
    packing = None
    if config.packing:
        train, packing = build_packed_dataset(
            train_examples, config.max_length, baseline_batch_size=batch_size, seed=seed
        )
    else:
        train = to_dataset(train_examples)
    return Datasets(
        train=train,
        eval=to_dataset(eval_examples) if eval_examples else None,
        stats=stats,
        template=template,
        packing=packing,
    )


def _streaming_datasets(config: DataConfig, tokenizer: Any, template: Template) -> Datasets:
    eval_examples: list[Example] = []
    stats = []
    for index, spec in enumerate(config.eval_datasets):
        examples, stat = tokenize_dataset(
            spec, tokenizer, _template_for(spec, template, tokenizer, f"data.eval_datasets.{index}"), config.max_length,
            f"data.eval_datasets.{index}", config.on_bad_rows,
        )
        eval_examples.extend(examples)
        stats.append(stat)
    return Datasets(
        train=stream_text_dataset(config, tokenizer),  # type: ignore[arg-type]
        eval=to_dataset(eval_examples) if eval_examples else None,
        stats=stats,
        template=template,
    )


def build_datasets(
    config: DataConfig, tokenizer: Any, seed: int, *, use_cache: bool = True, batch_size: int = 8,
    images: ImageInputs | None = None, peers_wait: bool = False, wait_seconds: float | None = None,
) -> Datasets:
    """Tokenised train and eval sets plus per-dataset statistics, from the cache when possible.

    Without `eval_datasets`, `eval_split` holds out a seeded fraction of each dataset's examples
    before mixing, so a repeated example never lands in both splits. With `packing`, training
    examples are packed into rows, image examples with their image paths (`batch_size` only
    sets the padded baseline that packing efficiency is compared with).

    Several processes: the one with `peers_wait` builds (and leaves a failure marker if it
    fails); those with `wait_seconds` wait for its cache entry that long, then load it.
    """
    template = _resolve(config.datasets[0], tokenizer, "data.datasets.0")
    if config.streaming:
        return _streaming_datasets(config, tokenizer, template)
    datasets = cached_datasets(
        config, tokenizer, seed, template, lambda: _tokenize_all(config, tokenizer, template, seed, batch_size, images),
        extra=images.fingerprint() if images else "", use_cache=use_cache, peers_wait=peers_wait,
        wait_seconds=wait_seconds,
    )
    datasets.images = images
    return datasets


def cached_datasets(
    config: DataConfig, tokenizer: Any, seed: int, template: Template, build: Callable[[], Datasets], *,
    extra: str = "", use_cache: bool = True, peers_wait: bool = False, wait_seconds: float | None = None,
) -> Datasets:
    """`build()`'s datasets through the tokenisation cache, for supervised and preference data alike.

    The entry's key covers the data, the tokenizer, the `data` section, `seed` and `extra` (what
    else changes the result). Several processes: the one with `peers_wait` builds (and leaves a
    failure marker if it fails); those with `wait_seconds` wait for its entry that long, then load it.
    """
    cache = DataCache(config, tokenizer, seed, extra=extra) if use_cache else None
    if cache is not None and wait_seconds is not None:
        cache.wait(wait_seconds)
    if cache is not None:
        cached = cache.load()
        if cached is not None:
            train, evaluation, meta = cached
            stats = [DatasetStats(**s) for s in meta["datasets"]]
            packing = PackingStats(**meta["packing"]) if meta.get("packing") else None
            return Datasets(train, evaluation, stats, template, from_cache=True, packing=packing, fingerprint=cache.key)
    if cache is not None and peers_wait:
        cache.clear_failure()
    try:
        datasets = build()
        if cache is not None:
            datasets.fingerprint = cache.key
            meta = {
                "datasets": [vars(s) for s in datasets.stats],
                "packing": vars(datasets.packing) if datasets.packing else None,
            }
            cache.save(datasets.train, datasets.eval, meta)
    except BaseException as error:
        if cache is not None and peers_wait:
            cache.mark_failed(error)
        raise
    return datasets


__all__ = ["DatasetStats", "Datasets", "build_datasets", "cached_datasets", "encode_rows", "mix", "to_dataset", "tokenize_dataset"]
