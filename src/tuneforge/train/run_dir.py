"""The run directory: refuse to clobber it, find the checkpoint to resume, write the final model.

    runs/NAME/
      config.yaml      resolved config
      metrics.jsonl    every log line (loss, lr, tokens/s, eval)
      checkpoint-N/    Trainer checkpoints (resume from these)
      model/           final weights or adapter, tokenizer, tuneforge.json
      base/            random-init base weights, when an adapter was trained on them
      merged/          adapter merged into the base (method.merge)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from tuneforge import __version__
from tuneforge.config.schema import OutputConfig
from tuneforge.errors import ConfigError
from tuneforge.train.checkpoints import find_good_checkpoint, read_manifest

RUN_METADATA = "tuneforge.json"


def prepare_run_dir(output: OutputConfig) -> Path:
    """Create the run directory, or check it may be reused.

    Raises:
        ConfigError: it holds files and neither resuming nor `overwrite` was asked for.
    """
    assert output.dir is not None
    path = Path(output.dir)
    if path.exists() and any(path.iterdir()):
        if output.overwrite:
            if not (path / "config.yaml").exists():
                raise ConfigError(
                    "refusing to delete a directory that is not a tuneforge run",
                    where=f"output.dir={path}",
                    hint="choose an empty or new directory",
                )
            shutil.rmtree(path)
        elif output.resume == "never":
            raise ConfigError(
                "the run directory already holds files",
                where=f"output.dir={path}",
                hint="continue it with output.resume=auto, start over with output.overwrite=true, "
                "or choose another output.dir",
            )
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".tuneforge-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise ConfigError(
            f"cannot write to the run directory: {error.strerror or error}",
            where=f"output.dir={path}",
            hint="choose a directory you can write to",
        ) from None
    return path


def find_resume_checkpoint(output: OutputConfig, run_dir: Path) -> str | None:
    """The checkpoint `output.resume` asks for, or None to start from scratch."""
    if output.resume == "never":
        return None
    if output.resume == "auto":
        # Only complete checkpoints: a save killed half-way is never resumed from.
        return find_good_checkpoint(run_dir)
    if not Path(output.resume).is_dir():
        raise ConfigError(
            "checkpoint directory not found",
            where=f"output.resume={output.resume}",
            hint="use auto, never, or a checkpoint-N directory",
        )
    return output.resume


def check_disk_space(run_dir: Path, needed: int) -> None:
    """Fail before training when the checkpoints the run will keep cannot fit on the disk."""
    free = shutil.disk_usage(run_dir).free
    if needed > free:
        raise ConfigError(
            f"the run will write about {needed / 2**30:.1f} GiB of checkpoints and the final model, "
            f"but only {free / 2**30:.1f} GiB is free",
            where=f"output.dir={run_dir}",
            hint="free space, choose another output.dir, lower train.save_total_limit, or save less often",
        )


def check_resume_data(checkpoint: str, fingerprint: str | None, allowed: bool) -> None:
    """Refuse to resume on other data than the checkpoint was trained on (PITFALLS 13): the data
    order, the position in it and the examples themselves would silently differ.

    Raises:
        ConfigError: the checkpoint records another data fingerprint and `allowed` is false.
    """
    saved = read_manifest(checkpoint).get("data_fingerprint")
    if allowed or saved is None or fingerprint is None or saved == fingerprint:
        return
    raise ConfigError(
        f"the training data changed since {Path(checkpoint).name} was written (data fingerprint "
        f"{saved} then, {fingerprint} now: files, tokenizer, template or data settings differ)",
        where=f"output.resume ({checkpoint})",
        hint="restore the data, or continue on the new data with output.resume_on_changed_data=true",
    )


def checkpoint_step(checkpoint: str) -> int:
    return int(Path(checkpoint).name.rsplit("-", 1)[-1])


def trim_metrics(path: Path, last_step: int) -> None:
    """Drop log lines written after the checkpoint a resumed run restarts from."""
    if not path.exists():
        return
    kept = [
        line
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip() and json.loads(line).get("step", 0) <= last_step
    ]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def write_run_metadata(model_dir: Path, **fields: Any) -> None:
    """What `generate` needs to use a saved model as training did (template, base model)."""
    metadata = {"tuneforge_version": __version__, **fields}
    (model_dir / RUN_METADATA).write_text(json.dumps(metadata, indent=2, ensure_ascii=False) + "\n")


def read_run_metadata(model_dir: Path) -> dict[str, Any]:
    path = model_dir / RUN_METADATA
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


__all__ = [
    "RUN_METADATA",
    "check_disk_space",
    "check_resume_data",
    "checkpoint_step",
    "find_resume_checkpoint",
    "prepare_run_dir",
    "read_run_metadata",
    "trim_metrics",
    "write_run_metadata",
]
