"""Streaming continued pretraining: documents are read and tokenised while training runs.

For corpora larger than memory (`data.streaming: true`): nothing is cached, rows are read
lazily, and blocks of `max_length` tokens are produced on the fly.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from datasets import IterableDataset

from tuneforge.config.schema import DataConfig, DatasetSpec
from tuneforge.data.formats import document_text
from tuneforge.data.sources import Row, iter_json_lines, read_file, source_files
from tuneforge.errors import DataError


def _iter_rows(spec: DatasetSpec) -> Iterator[Row]:
    for path in source_files(spec):
        if path.suffix in (".jsonl", ".ndjson"):
            yield from iter_json_lines(path)
        else:
            yield from read_file(path)


def _blocks(specs: list[DatasetSpec], tokenizer: Any, block_size: int) -> Iterator[dict[str, list[int]]]:
    buffer: list[int] = []
    for spec in specs:
        for row in _iter_rows(spec):
            buffer.extend(tokenizer(document_text(row, spec), add_special_tokens=True)["input_ids"])
            if tokenizer.eos_token_id is not None:
                buffer.append(tokenizer.eos_token_id)
            while len(buffer) >= block_size:
                block, buffer = buffer[:block_size], buffer[block_size:]
                yield {"input_ids": block, "labels": list(block)}
    if len(buffer) > 1:
        yield {"input_ids": buffer, "labels": list(buffer)}


def stream_text_dataset(config: DataConfig, tokenizer: Any) -> IterableDataset:
    """An iterable dataset of `max_length` blocks over every training dataset, in order."""
    not_text = [spec.name for spec in config.datasets if spec.format != "text"]
    if not_text or any(spec.source is not None for spec in config.datasets):
        raise DataError(
            "streaming reads local text-format files only",
            where="data.streaming",
            hint=f"set format: text (not for: {', '.join(not_text)}) or turn streaming off",
        )
    unsupported = [
        f"data.datasets.{i}.{key}"
        for i, spec in enumerate(config.datasets)
        for key in ("max_rows", "weight", "samples")
        if getattr(spec, key) is not None
    ]
    if config.eval_split > 0:
        unsupported.append("data.eval_split (use data.eval_datasets)")
    if config.on_bad_rows == "skip":
        unsupported.append("data.on_bad_rows: skip")
    if unsupported:
        raise DataError(
            f"streaming reads each file once, in order; it cannot apply: {', '.join(unsupported)}",
            where="data.streaming",
            hint="remove those settings, or turn streaming off",
        )
    return IterableDataset.from_generator(
        _blocks, gen_kwargs={"specs": config.datasets, "tokenizer": tokenizer, "block_size": config.max_length}
    )


__all__ = ["stream_text_dataset"]
