"""Read rows from JSON / JSON-lines files (or a `_target_` callable), remembering where each came from.

Every row carries its origin (`file:line`) so later errors can point at it.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneforge.config.schema import DatasetSpec
from tuneforge.config.targets import instantiate
from tuneforge.errors import DataError

SUPPORTED_SUFFIXES = (".json", ".jsonl", ".ndjson")


@dataclass(frozen=True)
class Row:
    """One record and where it came from (`data/train.jsonl:12`)."""

    fields: dict[str, Any]
    origin: str


def resolve_files(path: str) -> list[Path]:
    """A file, a directory (its JSON/JSONL files) or a glob, as a sorted list of files."""
    candidate = Path(path)
    if candidate.is_file():
        return [candidate]
    if candidate.is_dir():
        files = sorted(p for p in candidate.iterdir() if p.suffix in SUPPORTED_SUFFIXES)
    else:
        files = sorted(Path(p) for p in glob.glob(path, recursive=True) if Path(p).is_file())
    if not files:
        what = "directory has no .json/.jsonl files" if candidate.is_dir() else "no such file"
        raise DataError(
            what,
            where=path,
            hint=f"paths are relative to the current directory ({Path.cwd()}); "
            "a directory or a glob such as data/partition_*.json also works",
        )
    return files


def _decode(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(
            f"not valid UTF-8 (byte {exc.start}: {raw[exc.start:exc.start + 1]!r})",
            where=f"{path}:{line}",
            hint="re-save the file as UTF-8",
        ) from None


def _read_json_lines(path: Path, text: str) -> list[Row]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"malformed JSON: {exc.msg} (column {exc.colno})",
                where=f"{path}:{number}",
                hint="each line of a JSON-lines file must be one complete JSON object",
            ) from None
        if not isinstance(record, dict):
            raise DataError(
                f"expected a JSON object, found {type(record).__name__}", where=f"{path}:{number}"
            )
        rows.append(Row(record, f"{path}:{number}"))
    return rows


def read_file(path: Path) -> list[Row]:
    """Rows of one file: a JSON array of objects, or JSON lines (whatever the suffix says)."""
    text = _decode(path)
    stripped = text.lstrip()
    if path.suffix == ".json" and stripped.startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"malformed JSON: {exc.msg}", where=f"{path}:{exc.lineno}") from None
        rows = []
        for index, record in enumerate(records):
            if not isinstance(record, dict):
                raise DataError(
                    f"item {index} is a {type(record).__name__}, expected a JSON object",
                    where=str(path),
                )
            rows.append(Row(record, f"{path}[{index}]"))
        return rows
    # JSON lines, including `.json` files written one object per line (JGLUE does this).
    return _read_json_lines(path, text)


def _rows_from_component(spec: DatasetSpec, key: str) -> list[Row]:
    assert spec.source is not None
    produced = instantiate(spec.source, key)
    if not isinstance(produced, Iterable) or isinstance(produced, (str, bytes, dict)):
        raise DataError(
            f"'{spec.source.target}' returned {type(produced).__name__}, expected rows "
            "(a list of dicts or a datasets.Dataset)",
            where=key,
        )
    rows = []
    for index, record in enumerate(produced):
        if not isinstance(record, dict):
            raise DataError(
                f"row {index} is a {type(record).__name__}, expected a dict",
                where=f"{spec.source.target}",
            )
        rows.append(Row(dict(record), f"{spec.source.target} row {index}"))
    return rows


def read_rows(spec: DatasetSpec, key: str) -> list[Row]:
    """All rows of one configured dataset, in file order, limited to `max_rows`."""
    if spec.source is not None:
        rows = _rows_from_component(spec, key)
    else:
        assert spec.path is not None
        rows = [row for path in resolve_files(spec.path) for row in read_file(path)]
    if spec.max_rows is not None:
        rows = rows[: spec.max_rows]
    if not rows:
        raise DataError("the dataset has no rows", where=spec.name)
    return rows


__all__ = ["Row", "read_file", "read_rows", "resolve_files"]
