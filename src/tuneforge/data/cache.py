"""The tokenised-data cache: tokenisation runs once; later launches load Arrow files.

The key covers everything that changes the result (PITFALLS 6): the data files' bytes (or a
component's rows), the tokenizer's vocabulary, merges, special tokens and chat template, the
`data` config section, the seed and the tuneforge version. Entries are written to a temporary
folder and renamed into place, so a killed preprocessing run never leaves half an entry.

With several processes one of them fills an entry while the others wait for it on the file
system (`wait`), not in a collective: preprocessing may take longer than any collective
timeout (PITFALLS 7), and a collective around it (`main_process_first`) is what deadlocks or
times out elsewhere. If the builder fails it leaves `<key>.failed` with its error, which the
waiting processes raise instead of waiting out their timeout.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from datasets import (
    Dataset,
    disable_progress_bars,
    enable_progress_bars,
    load_from_disk,
)

from tuneforge import __version__
from tuneforge.config.schema import DataConfig, DatasetSpec
from tuneforge.data.sources import HF_PREFIX, read_rows, source_files
from tuneforge.errors import DataError

# Settings that do not change the tokenised result.
NOT_IN_KEY = {"num_proc", "cache_dir"}
# A failure marker older than this before a waiter started is from an earlier launch.
STALE_FAILURE_SECONDS = 60
# Bumped whenever what an entry holds changes, so older entries are never misread.
CACHE_FORMAT = 2


def default_cache_root() -> Path:
    return Path(os.environ.get("TUNEFORGE_CACHE", Path.home() / ".cache" / "tuneforge")) / "data"


def cache_root(config: DataConfig) -> Path:
    """The folder holding the entries: `data.cache_dir`, else the default."""
    return Path(config.cache_dir) if config.cache_dir else default_cache_root()


def _hash_file(path: Path, digest: Any) -> None:
    digest.update(str(path.resolve()).encode())
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)


def _hash_dataset(spec: DatasetSpec, key: str, digest: Any) -> None:
    if spec.source is not None:
        # A component's output can change without its arguments changing: hash the rows.
        rows = read_rows(spec, key)
        digest.update(json.dumps([r.fields for r in rows], sort_keys=True, default=str).encode())
    elif spec.path is not None and spec.path.startswith(HF_PREFIX):
        digest.update(f"{spec.path}[{spec.split}]".encode())
    else:
        for path in source_files(spec):
            _hash_file(path, digest)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocabulary = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    parts = [
        type(tokenizer).__name__,
        vocabulary,
        json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str),
        str(getattr(tokenizer, "chat_template", None)),
        str(getattr(tokenizer, "add_bos_token", None)),
        str(getattr(tokenizer, "add_eos_token", None)),
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def cache_key(config: DataConfig, tokenizer: Any, seed: int, extra: str = "") -> str:
    """`extra`: settings from outside the `data` section that change the result (image token counts)."""
    digest = hashlib.sha256()
    digest.update(extra.encode())
    settings = config.model_dump(mode="json", by_alias=True, exclude=NOT_IN_KEY)
    digest.update(json.dumps({"version": __version__, "format": CACHE_FORMAT, "seed": seed, "data": settings}, sort_keys=True).encode())
    digest.update(tokenizer_fingerprint(tokenizer).encode())
    for group in ("datasets", "eval_datasets"):
        for index, spec in enumerate(getattr(config, group)):
            _hash_dataset(spec, f"data.{group}.{index}", digest)
    return digest.hexdigest()[:24]


class DataCache:
    """One cache entry: `train/`, `eval/` (Arrow, via `datasets`) and `stats.json`."""

    def __init__(self, config: DataConfig, tokenizer: Any, seed: int, extra: str = "") -> None:
        self.key = cache_key(config, tokenizer, seed, extra)
        self.path = cache_root(config) / self.key

    def load(self) -> tuple[Dataset, Dataset | None, dict[str, Any]] | None:
        if not (self.path / "stats.json").exists():
            return None
        train = load_from_disk(str(self.path / "train"))
        evaluation = load_from_disk(str(self.path / "eval")) if (self.path / "eval").exists() else None
        meta = json.loads((self.path / "stats.json").read_text(encoding="utf-8"))
        print(f"[tuneforge] reusing tokenised data from cache {self.path}", flush=True)
        return train, evaluation, meta

    def save(self, train: Dataset, evaluation: Dataset | None, meta: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{self.key}-", dir=self.path.parent))
        disable_progress_bars()  # one line says what happened; no bars for a local copy
        try:
            train.save_to_disk(str(staging / "train"))
            if evaluation is not None:
                evaluation.save_to_disk(str(staging / "eval"))
            (staging / "stats.json").write_text(json.dumps(meta), encoding="utf-8")
            if self.path.exists():  # another process finished first: keep theirs
                shutil.rmtree(staging)
                return
            try:
                staging.rename(self.path)
            except OSError:
                if not self.path.is_dir():
                    raise
                # Another node's rank 0 on a shared filesystem renamed its copy in since the check.
                shutil.rmtree(staging)
                return
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        finally:
            enable_progress_bars()
        print(f"[tuneforge] tokenised data cached in {self.path}", flush=True)

    @property
    def failure_marker(self) -> Path:
        return self.path.parent / f"{self.key}.failed"

    def mark_failed(self, error: BaseException) -> None:
        """Tell the processes waiting for this entry that it will not come, and why."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.failure_marker.write_text(str(error) or type(error).__name__, encoding="utf-8")

    def clear_failure(self) -> None:
        self.failure_marker.unlink(missing_ok=True)

    def wait(self, timeout_seconds: float, poll_seconds: float = 0.2) -> None:
        """Block until another process has filled this entry (a file barrier).

        Raises:
            DataError: that process failed (its error is repeated), or `timeout_seconds` passed.
        """
        started = time.time()
        while not (self.path / "stats.json").exists():
            marker = self.failure_marker
            try:
                if marker.stat().st_mtime >= started - STALE_FAILURE_SECONDS:
                    raise DataError(
                        f"the process preprocessing the data failed: {marker.read_text(encoding='utf-8')}",
                        where=f"tokenisation cache {self.path}",
                        hint="local rank 0's log has the details; fix it there, or run tuneforge preprocess CONFIG",
                    )
            except FileNotFoundError:
                pass
            if time.time() - started > timeout_seconds:
                raise DataError(
                    f"waited {timeout_seconds / 60:.1f} minutes for local rank 0 to fill the tokenisation cache",
                    where=f"tokenisation cache {self.path}",
                    hint="run tuneforge preprocess CONFIG before the launch, or raise "
                    "distributed.preprocess_timeout_minutes; on several nodes see docs/distributed.md (shared cache)",
                )
            time.sleep(poll_seconds)


__all__ = ["DataCache", "cache_key", "cache_root", "default_cache_root", "tokenizer_fingerprint"]
