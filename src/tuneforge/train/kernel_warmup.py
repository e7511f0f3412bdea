"""A process beside the run that compiles Liger's Triton kernels before its first step.

On a host whose Triton cache is empty, a run's first steps wait for Triton to compile Liger's
kernels (3.5 s of a 25 s 8B run on an H200, docs/benchmarks.md). `tuneforge.train` starts
`python -m tuneforge.train.kernel_compile` first thing, before it imports transformers, so the
compiling overlaps the run's imports, data and model loading; the steps then read the kernels
from Triton's on-disk cache. This module only starts, waits for and reports on that process: it
imports nothing beyond the standard library, so the process starts seconds before torch loads.

Training never waits for it: when training begins, a process still running is stopped (a small
model is ready before the process has imported its libraries, and on a busy host compiling can
take longer than the first steps would). Each kernel it compiled is already in Triton's cache;
the first steps compile the rest, as without it.

    with start_kernel_warmup(config, overrides) as warmup:
        ...                      # the run imports, builds its data and model
        print(warmup.finish())   # as training begins: stops the process if it runs, says what it did
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

PREFIX = "Triton kernel warm-up"
# The process's folder: what it reads, the mark it leaves once it compiles, what it reports.
REQUEST, COMPILING, REPORT = "request.json", "compiling", "report.json"
NVIDIA_DRIVER = Path("/dev/nvidiactl")  # present where NVIDIA's driver runs (Linux)


def worth_starting(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this process should start one, judged without importing torch: the first process
    of its node (the others find the node's shared cache filled), an NVIDIA driver, and Liger."""
    return (
        environ.get("LOCAL_RANK", "0") == "0"
        and environ.get("CUDA_VISIBLE_DEVICES") not in ("", "-1")
        and NVIDIA_DRIVER.exists()
        and importlib.util.find_spec("liger_kernel") is not None
    )


def _request(config: Any, overrides: list[str] | None) -> dict[str, Any]:
    """What the process loads its config from: the run's YAML path or dict, or a validated
    `Config` written as the run directory's config.yaml is."""
    if isinstance(config, (str, Path, dict)):
        source = str(config) if isinstance(config, Path) else config
    else:
        import yaml

        # Imported already by whoever built the Config.
        from tuneforge.config.loading import dump_config

        source = yaml.safe_load(dump_config(config))
    return {"config": source, "overrides": list(overrides or [])}


class KernelWarmup:
    """The process (None when none was started); `finish` stops it if it runs and says what it did.
    Nothing here raises: without the process, the kernels compile in the first steps as before."""

    def __init__(self, process: subprocess.Popen[bytes] | None = None, folder: Path | None = None) -> None:
        self._process = process
        self._folder = folder
        self._started_at = time.time()

    def finish(self) -> str | None:
        """Stop the process if it still runs; the log's line (None: none was started)."""
        if self._process is None or self._folder is None:
            return None
        code = self._process.poll()
        if code is None:
            phase = "compiling" if (self._folder / COMPILING).exists() else "importing its libraries"
            ran = time.time() - self._started_at
            self.close()  # each kernel it finished is in Triton's cache
            return f"{PREFIX} stopped: still {phase} {ran:.1f} s after it started; the first steps compile the rest"
        report_path = self._folder / REPORT
        if not report_path.exists():
            log = (self._folder / "log.txt").read_text(encoding="utf-8", errors="replace").strip().splitlines()
            self.close()
            return f"{PREFIX} failed (exit code {code}: {log[-1] if log else 'no output'}); the first steps compile the kernels"
        report = json.loads(report_path.read_text(encoding="utf-8"))
        self.close()
        if "error" in report:
            return f"{PREFIX} failed ({report['error']}); the first steps compile the kernels"
        if "skipped" in report:
            return f"{PREFIX}: {report['skipped']}"
        return (
            f"{PREFIX}: Liger's kernels compiled for {report['shapes']} step shapes in "
            f"{report['compile_seconds']:.1f} s, by a process that ended {report['finished_at'] - self._started_at:.1f} s "
            "after it started, before training began"
        )

    def close(self) -> None:
        """End the process if it still runs and remove its files."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    def __enter__(self) -> KernelWarmup:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def start_kernel_warmup(config: Any, overrides: list[str] | None = None) -> KernelWarmup:
    """Start the process for the run of `config` (a YAML path, a dict or a `Config`) with
    `overrides`, where `worth_starting` says so; it reads the config through the same validation."""
    if not worth_starting():
        return KernelWarmup()
    # The package's own root first, so the process imports this tuneforge whatever the path.
    package_root = str(Path(__file__).resolve().parents[2])
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    folder = None
    try:
        folder = Path(tempfile.mkdtemp(prefix="tuneforge-kernel-warmup-"))
        (folder / REQUEST).write_text(json.dumps(_request(config, overrides), default=str), encoding="utf-8")
        with open(folder / "log.txt", "wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "tuneforge.train.kernel_compile", str(folder)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=environ,
            )
    except OSError:  # no temporary storage or no process to spare: the steps compile the kernels
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        return KernelWarmup()
    return KernelWarmup(process, folder)


__all__ = ["COMPILING", "NVIDIA_DRIVER", "PREFIX", "REPORT", "REQUEST", "KernelWarmup", "start_kernel_warmup", "worth_starting"]
