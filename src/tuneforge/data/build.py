"""Build the training and evaluation datasets from the `data` config section.

    datasets = build_datasets(config.data, tokenizer, seed=config.train.seed)
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from datasets import Dataset

from tuneforge.config.schema import DataConfig, DatasetSpec
from tuneforge.data.formats import document_text, instruction_texts
from tuneforge.data.sources import read_rows
from tuneforge.data.tokenize import IGNORE_INDEX, Example, build_instruction_example, pack_documents
from tuneforge.errors import DataError


@dataclass
class DatasetStats:
    """What preprocessing did to one dataset; printed before training."""

    name: str
    rows: int = 0
    examples: int = 0
    dropped_too_long: int = 0
    truncated: int = 0
    tokens: int = 0
    trained_tokens: int = 0

    def describe(self) -> str:
        text = (
            f"{self.name}: {self.rows} rows -> {self.examples} examples, "
            f"{self.tokens} tokens ({self.trained_tokens} trained)"
        )
        if self.dropped_too_long:
            text += f", {self.dropped_too_long} dropped (prompt fills max_length)"
        if self.truncated:
            text += f", {self.truncated} truncated"
        return text


@dataclass
class Datasets:
    train: Dataset
    eval: Dataset | None
    stats: list[DatasetStats] = field(default_factory=list)


def tokenize_dataset(
    spec: DatasetSpec, tokenizer: Any, max_length: int, key: str
) -> tuple[list[Example], DatasetStats]:
    """Read, format and tokenise one dataset."""
    rows = read_rows(spec, key)
    stats = DatasetStats(name=spec.name, rows=len(rows))
    if spec.format == "text":
        examples = pack_documents(tokenizer, [document_text(row, spec) for row in rows], max_length)
    else:
        examples = []
        for row in rows:
            prompt, response = instruction_texts(row, spec)
            example = build_instruction_example(tokenizer, prompt, response, max_length)
            if example is None:
                stats.dropped_too_long += 1
                continue
            stats.truncated += example.truncated
            examples.append(example)
    stats.examples = len(examples)
    stats.tokens = sum(len(e.input_ids) for e in examples)
    stats.trained_tokens = sum(sum(label != IGNORE_INDEX for label in e.labels) for e in examples)
    if not examples:
        raise DataError(
            f"no usable examples: all {stats.rows} rows were dropped because the prompt alone "
            f"fills max_length={max_length}",
            where=spec.name,
            hint="raise data.max_length or shorten the prompts",
        )
    return examples, stats


def _to_dataset(examples: list[Example]) -> Dataset:
    return Dataset.from_dict(
        {"input_ids": [e.input_ids for e in examples], "labels": [e.labels for e in examples]}
    )


def build_datasets(config: DataConfig, tokenizer: Any, seed: int) -> Datasets:
    """Tokenised train and eval sets plus per-dataset statistics.

    Without `eval_datasets`, `eval_split` holds out a seeded random fraction of the
    training examples.
    """
    train_examples: list[Example] = []
    eval_examples: list[Example] = []
    stats = []
    for index, spec in enumerate(config.datasets):
        examples, stat = tokenize_dataset(spec, tokenizer, config.max_length, f"data.datasets.{index}")
        train_examples.extend(examples)
        stats.append(stat)
    for index, spec in enumerate(config.eval_datasets):
        examples, stat = tokenize_dataset(
            spec, tokenizer, config.max_length, f"data.eval_datasets.{index}"
        )
        stat.name = f"{stat.name} (eval)"
        eval_examples.extend(examples)
        stats.append(stat)
    if not config.eval_datasets and config.eval_split > 0:
        order = list(range(len(train_examples)))
        random.Random(seed).shuffle(order)
        held_out = max(1, round(len(order) * config.eval_split))
        if held_out >= len(order):
            raise DataError(
                f"eval_split={config.eval_split} leaves no training examples out of {len(order)}",
                where="data.eval_split",
            )
        eval_set = set(order[:held_out])
        eval_examples = [e for i, e in enumerate(train_examples) if i in eval_set]
        train_examples = [e for i, e in enumerate(train_examples) if i not in eval_set]
    return Datasets(
        train=_to_dataset(train_examples),
        eval=_to_dataset(eval_examples) if eval_examples else None,
        stats=stats,
    )


__all__ = ["DatasetStats", "Datasets", "build_datasets", "tokenize_dataset"]
