"""Read rows from JSON / JSON-lines files (or a `_target_` callable), remembering where each came from.

Every row carries its origin (`file:line`) so later errors can point at it.
"""

from __future__ import annotations

import csv
import glob
import io
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneforge.config.schema import DatasetSpec
from tuneforge.config.targets import instantiate
from tuneforge.errors import DataError

SUPPORTED_SUFFIXES = (".json", ".jsonl", ".ndjson", ".csv", ".parquet")
HF_PREFIX = "hf:"


@dataclass
class BadRows:
    """Collects unusable rows when `on_bad_rows: skip`; otherwise re-raises the first one."""

    skip: bool = False
    count: int = 0
    reasons: list[str] = field(default_factory=list)

    def handle(self, error: DataError) -> None:
        if not self.skip:
            raise error
        self.count += 1
        if len(self.reasons) < 3:
            self.reasons.append(str(error).splitlines()[0])


@dataclass(frozen=True)
class Row:
    """One record and where it came from (`data/train.jsonl:12`)."""

    fields: dict[str, Any]
    origin: str


def resolve_files(path: str, root: str | None = None) -> list[Path]:
    """A file, a directory (its JSON/JSONL files) or a glob, as a sorted list of files.

    With a `root`, a relative `path` is taken from it, and every file found must lie inside it
    once `..` and symbolic links are resolved.
    """
    if root is not None:
        path = str(Path(root) / path)  # an absolute `path` stays as it is, then fails the check
    candidate = Path(path)
    if candidate.is_file():
        files = [candidate]
    elif candidate.is_dir():
        files = sorted(p for p in candidate.iterdir() if p.suffix in SUPPORTED_SUFFIXES)
    else:
        files = sorted(Path(p) for p in glob.glob(path, recursive=True) if Path(p).is_file())
    if not files:
        what = "directory has no data files" if candidate.is_dir() else "no such file"
        raise DataError(
            what,
            where=path,
            hint=f"paths are relative to {f'the data root ({root})' if root else f'the current directory ({Path.cwd()})'}; "
            f"a directory or a glob such as data/partition_*.json also works "
            f"({', '.join(SUPPORTED_SUFFIXES)})",
        )
    if root is not None:
        for file in files:
            check_inside(root, file, where=path)
    return files


def check_inside(root: str | Path, path: str | Path, where: str) -> Path:
    """`path` resolved (links followed); it must be `root` or lie under it.

    Raises:
        DataError: The path leads out of the root, by `..`, an absolute path or a link.
    """
    real_root, real = Path(root).resolve(), Path(path).resolve()
    if not real.is_relative_to(real_root):
        raise DataError(
            f"'{path}' leads outside the data root {real_root} (to {real})",
            where=where,
            hint="move the file under the root, or change data.root / the dataset's root",
        )
    return real


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


def _parse_json_line(path: Path, line: str, number: int) -> Row | None:
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"malformed JSON: {exc.msg} (column {exc.colno})",
            where=f"{path}:{number}",
            hint="each line of a JSON-lines file must be one complete JSON object",
        ) from None
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, found {type(record).__name__}", where=f"{path}:{number}")
    return Row(record, f"{path}:{number}")


def _read_json_lines(path: Path, text: str, bad_rows: BadRows) -> list[Row]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        try:
            row = _parse_json_line(path, line, number)
        except DataError as error:
            bad_rows.handle(error)
            continue
        if row is not None:
            rows.append(row)
    return rows


def _read_csv(path: Path, text: str, bad_rows: BadRows) -> list[Row]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows = []
    for record in reader:
        # DictReader puts surplus cells under the key None: that is a malformed line.
        if None in record:
            bad_rows.handle(
                DataError(
                    f"row has {len(reader.fieldnames or []) + len(record[None])} cells but the header has "
                    f"{len(reader.fieldnames or [])}",
                    where=f"{path}:{reader.line_num}",
                    hint="quote cells that contain commas",
                )
            )
            continue
        rows.append(Row(dict(record), f"{path}:{reader.line_num}"))
    return rows


def _read_parquet(path: Path) -> list[Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several unrelated types for a damaged file
        raise DataError(f"cannot read Parquet: {exc}", where=str(path)) from None
    return [Row(record, f"{path} row {index}") for index, record in enumerate(table.to_pylist())]


def read_file(path: Path, bad_rows: BadRows | None = None) -> list[Row]:
    """Rows of one file: JSON (an array, or one object a line), JSON lines, CSV or Parquet."""
    if path.suffix == ".parquet":
        return _read_parquet(path)
    text = _decode(path)
    if path.suffix == ".csv":
        return _read_csv(path, text, bad_rows or BadRows())
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
    return _read_json_lines(path, text, bad_rows or BadRows())


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


def _rows_from_hub(name: str, split: str) -> list[Row]:
    from datasets import load_dataset

    try:
        dataset = load_dataset(name, split=split)
    except Exception as exc:  # network, missing split, unknown id: all surface as one message
        raise DataError(
            f"cannot load dataset '{name}' (split '{split}'): {str(exc).splitlines()[0]}",
            where=f"{HF_PREFIX}{name}",
            hint="hub datasets need network access or a filled Hugging Face cache; "
            "a local folder path works too",
        ) from None
    return [Row(dict(record), f"{HF_PREFIX}{name}[{split}] row {index}") for index, record in enumerate(dataset)]


def source_files(spec: DatasetSpec) -> list[Path]:
    """The local files a dataset reads (empty for components and hub datasets)."""
    if spec.path is None or spec.path.startswith(HF_PREFIX):
        return []
    return resolve_files(spec.path, spec.root)


def read_rows(spec: DatasetSpec, key: str, bad_rows: BadRows | None = None) -> list[Row]:
    """All rows of one configured dataset, in file order, limited to `max_rows`."""
    if spec.source is not None:
        rows = _rows_from_component(spec, key)
    elif spec.path is not None and spec.path.startswith(HF_PREFIX):
        rows = _rows_from_hub(spec.path[len(HF_PREFIX):], spec.split)
    else:
        rows = [row for path in source_files(spec) for row in read_file(path, bad_rows)]
    if spec.max_rows is not None:
        rows = rows[: spec.max_rows]
    if not rows:
        raise DataError("the dataset has no rows", where=spec.name)
    return rows


def iter_json_lines(path: Path) -> Iterator[Row]:
    """Rows of a JSON-lines file read lazily, for corpora larger than memory."""
    with path.open(encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, start=1):
            row = _parse_json_line(path, line, number)
            if row is not None:
                yield row


__all__ = ["HF_PREFIX", "BadRows", "Row", "check_inside", "iter_json_lines", "read_file", "read_rows", "resolve_files", "source_files"]
