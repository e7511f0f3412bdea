"""Atomic checkpoints: a `checkpoint-N` directory either is complete or does not exist.

Trainer writes `checkpoint-N` in place, so a kill mid-save leaves a directory that
`get_last_checkpoint` happily resumes from (PITFALLS 15). `AtomicCheckpointMixin` makes
Trainer write into `.partial-checkpoint-N/checkpoint-N`, record a manifest of what it wrote,
flush it to disk and only then rename it to `checkpoint-N`:

    runs/NAME/
      checkpoint-9000/                 complete: holds tuneforge_checkpoint.json (the manifest)
      checkpoint-10000/                complete
      .partial-checkpoint-11000/       a save that was killed: ignored, removed at the next save

The hidden staging name matches neither `get_last_checkpoint` nor Trainer's rotation glob, so
even code that does not know about the manifest never resumes from a half-written save.
Rotation (`save_total_limit`) orders by step number, counts complete checkpoints only and
always keeps the newest complete one. Before each save the free disk space is checked.

    class TuneforgeTrainer(AtomicCheckpointMixin, Trainer): ...
    find_good_checkpoint("runs/NAME")   # -> "runs/NAME/checkpoint-10000" or None
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from tuneforge.errors import TuneforgeError
from tuneforge.models.parameters import full_numel

MANIFEST = "tuneforge_checkpoint.json"
PARTIAL_PREFIX = ".partial-"
# Written last by Trainer; marks a checkpoint from before manifests existed as finished.
_TRAINER_STATE = "trainer_state.json"
_CHECKPOINT_NAME = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


class CheckpointSpaceError(TuneforgeError):
    """The disk cannot hold the next checkpoint."""


def checkpoint_dirs(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Every `checkpoint-N` directory, complete or not, as (step, path) in step order.

    Ordered by the number, not the name: checkpoint-9000 comes before checkpoint-10000.
    """
    root = Path(run_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _CHECKPOINT_NAME.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def is_complete_checkpoint(path: str | Path) -> bool:
    """Whether a checkpoint directory holds every file its save wrote, at full size.

    Checkpoints written through `AtomicCheckpointMixin` carry a manifest of file sizes. One
    without a manifest (plain Trainer, older tuneforge) counts as complete when it holds
    `trainer_state.json`, which Trainer writes after the weights, optimizer and RNG states.
    """
    path = Path(path)
    manifest = path / MANIFEST
    if not manifest.is_file():
        return (path / _TRAINER_STATE).is_file()
    try:
        files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    for name, size in files.items():
        try:
            if (path / name).stat().st_size != size:
                return False
        except OSError:
            return False
    return True


def good_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """The complete checkpoints of a run as (step, path), oldest step first."""
    return [(step, path) for step, path in checkpoint_dirs(run_dir) if is_complete_checkpoint(path)]


def find_good_checkpoint(run_dir: str | Path) -> str | None:
    """The complete checkpoint with the highest step, or None; incomplete ones are skipped."""
    good = good_checkpoints(run_dir)
    return str(good[-1][1]) if good else None


def directory_bytes(path: str | Path) -> int:
    return sum(file.stat().st_size for file in Path(path).rglob("*") if file.is_file())


def free_bytes(path: str | Path) -> int:
    """Free space on the file system holding `path` (a seam for tests)."""
    return shutil.disk_usage(path).free


def check_space_for_checkpoint(run_dir: str | Path, needed: int, step: int) -> None:
    """Fail before writing `checkpoint-<step>` when the disk cannot hold it.

    Raises:
        CheckpointSpaceError: naming the directory, the bytes needed and the bytes free.
    """
    free = free_bytes(run_dir)
    if needed > free:
        newest = find_good_checkpoint(run_dir)
        raise CheckpointSpaceError(
            f"saving {PREFIX_CHECKPOINT_DIR}-{step} needs about {needed:,} bytes ({needed / 2**30:.2f} GiB) "
            f"but only {free:,} bytes ({free / 2**30:.2f} GiB) are free",
            where=f"output.dir={run_dir}",
            hint="free space, lower train.save_total_limit, or save less often; "
            + (f"resume from {newest} with output.resume=auto" if newest else "no checkpoint was saved yet"),
        )


def write_manifest(checkpoint: Path, step: int, layout: dict[str, Any] | None = None) -> None:
    """Record every file of a finished checkpoint with its size, and flush them all to disk.

    `layout`: how many processes, with which engine, wrote it (see `distributed.py`)."""
    files = {}
    for file in sorted(checkpoint.rglob("*")):
        if file.is_file():
            _fsync_file(file)
            files[file.relative_to(checkpoint).as_posix()] = file.stat().st_size
    manifest = checkpoint / MANIFEST
    manifest.write_text(json.dumps({"step": step, **(layout or {}), "files": files}, indent=1) + "\n", encoding="utf-8")
    _fsync_file(manifest)


def read_manifest(checkpoint: str | Path) -> dict[str, Any]:
    """A checkpoint's manifest; empty for one without (plain Trainer, older tuneforge)."""
    try:
        return json.loads((Path(checkpoint) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def commit_checkpoint(staged: Path, final: Path, step: int, layout: dict[str, Any] | None = None) -> None:
    """Move a fully written checkpoint into place with one rename.

    A checkpoint of the same step already there (a resumed run saving that step again) is
    moved aside first and deleted after: at no moment is a half-written `final` visible.
    """
    write_manifest(staged, step, layout)
    _fsync_dir(staged)
    displaced = None
    if final.exists():
        displaced = final.with_name(f"{PARTIAL_PREFIX}{final.name}.old")
        shutil.rmtree(displaced, ignore_errors=True)
        os.replace(final, displaced)
    os.replace(staged, final)
    _fsync_dir(final.parent)
    if displaced is not None:
        shutil.rmtree(displaced, ignore_errors=True)


def remove_partial_checkpoints(run_dir: str | Path, keep: Path | None = None) -> None:
    """Delete leftovers of killed saves: staging directories and `checkpoint-N` dirs that are
    incomplete (neither is ever resumed from)."""
    root = Path(run_dir)
    if not root.is_dir():
        return
    for path in root.iterdir():
        if keep is not None and path == keep:
            continue
        if path.name.startswith(PARTIAL_PREFIX + PREFIX_CHECKPOINT_DIR) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
    for _, path in checkpoint_dirs(root):
        if not is_complete_checkpoint(path):
            shutil.rmtree(path, ignore_errors=True)


def rotate_checkpoints(run_dir: str | Path, save_total_limit: int | None, best: str | None = None) -> list[Path]:
    """Keep the newest `save_total_limit` complete checkpoints by step number, plus the best one.

    The newest complete checkpoint is never deleted, so the run can always resume.

    Returns:
        The deleted checkpoint directories.
    """
    if save_total_limit is None or save_total_limit <= 0:
        return []
    good = [path for _, path in good_checkpoints(run_dir)]
    keep = {path.resolve() for path in good[-save_total_limit:]}
    if best is not None:
        keep.add(Path(best).resolve())
    deleted = [path for path in good if path.resolve() not in keep]
    for path in deleted:
        shutil.rmtree(path, ignore_errors=True)
    return deleted


def estimate_save_bytes(model: Any, save_only_model: bool) -> int:
    """Bytes the first save writes: weights (trainable ones only for adapters), plus AdamW's two
    fp32 moments per trainable value unless only the model is saved."""
    adapter_only = hasattr(model, "peft_config")
    saved = trainable = 0
    for parameter in model.parameters():
        if parameter.requires_grad:
            trainable += full_numel(parameter)
        if parameter.requires_grad or not adapter_only:
            saved += full_numel(parameter) * parameter.element_size()
    return saved if save_only_model else saved + 2 * 4 * trainable


def estimate_run_bytes(model: Any, args: Any) -> int:
    """Bytes the run keeps on disk at most: the checkpoints rotation keeps (`save_total_limit`,
    2 when unset) and the final model, which holds the weights without optimizer state."""
    kept = 0 if args.save_strategy == "no" else (args.save_total_limit or 2)
    checkpoint = estimate_save_bytes(model, save_only_model=bool(args.save_only_model))
    return checkpoint * kept + estimate_save_bytes(model, save_only_model=True)


class AtomicCheckpointMixin:
    """Makes a `Trainer` subclass write checkpoints atomically and rotate them by step number.

    Put it before `Trainer` in the bases: `class TuneforgeTrainer(AtomicCheckpointMixin, Trainer)`.
    It reuses Trainer's own `_save_checkpoint` (weights, optimizer, scheduler, RNG, state,
    callbacks) and only redirects where it writes, so upstream additions to a checkpoint are kept.
    """

    _staging_root: str | None = None
    checkpoint_layout: dict[str, Any] | None = None  # written into each manifest

    def _get_output_dir(self, trial: Any) -> str:
        # Trainer._save_checkpoint writes to `<this>/checkpoint-N`: point it at the staging dir.
        if self._staging_root is not None:
            return self._staging_root
        return super()._get_output_dir(trial)  # type: ignore[misc]

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        args, state = self.args, self.state  # type: ignore[attr-defined]
        run_dir = Path(self._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        staging_root = run_dir / f"{PARTIAL_PREFIX}{name}"
        final = run_dir / name
        if args.should_save:
            run_dir.mkdir(parents=True, exist_ok=True)
            remove_partial_checkpoints(run_dir)
            check_space_for_checkpoint(run_dir, self._next_save_bytes(run_dir), state.global_step)
        if state.best_global_step:
            # Trainer looks for the best checkpoint in the (staging) output dir; find it in the real one.
            best = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{state.best_global_step}"
            if best.is_dir():
                state.best_model_checkpoint = str(best)
        self.accelerator.wait_for_everyone()  # type: ignore[attr-defined]
        self._staging_root = str(staging_root)
        try:
            # Upstream rotation inside this call sees only the staging dir and deletes nothing.
            super()._save_checkpoint(model, trial)  # type: ignore[misc]
        finally:
            self._staging_root = None
        staged = staging_root / name
        if state.best_model_checkpoint == str(staged):
            state.best_model_checkpoint = str(final)
            if args.should_save:
                state.save_to_json(str(staged / _TRAINER_STATE))
        # Every rank has written its shards before the checkpoint becomes visible.
        self.accelerator.wait_for_everyone()  # type: ignore[attr-defined]
        if args.should_save:
            commit_checkpoint(staged, final, state.global_step, self.checkpoint_layout)
            shutil.rmtree(staging_root, ignore_errors=True)
            rotate_checkpoints(run_dir, args.save_total_limit, state.best_model_checkpoint)
        self.accelerator.wait_for_everyone()  # type: ignore[attr-defined]

    def _next_save_bytes(self, run_dir: Path) -> int:
        newest = find_good_checkpoint(run_dir)
        if newest is not None:
            return directory_bytes(newest)
        return estimate_save_bytes(self.model, self.args.save_only_model)  # type: ignore[attr-defined]


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable; not every platform can open a directory.
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


__all__ = [
    "MANIFEST",
    "AtomicCheckpointMixin",
    "CheckpointSpaceError",
    "check_space_for_checkpoint",
    "checkpoint_dirs",
    "commit_checkpoint",
    "estimate_run_bytes",
    "find_good_checkpoint",
    "good_checkpoints",
    "is_complete_checkpoint",
    "read_manifest",
    "rotate_checkpoints",
]
