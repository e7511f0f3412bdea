"""A process beside the run that compiles Liger's Triton kernels before its first step.

On a host whose Triton cache is empty, a run's first steps wait for Triton to compile Liger's
kernels (3.5 s of a 25 s 8B run on an H200, docs/benchmarks.md). `tuneforge.train` starts
`python -m tuneforge.train.kernel_compile` first thing, before it imports transformers, so the
compiling overlaps the run's imports, data and model loading; the steps then read the kernels
from Triton's on-disk cache. This module only starts, waits for and reports on that process: it
imports nothing beyond the standard library, so the process starts seconds before torch loads.

When training begins, a process that is compiling is waited for (what it has left is what the
first steps would compile anyway); one still importing its libraries is stopped, since waiting
for it would cost more than the first steps' own compiling (a small model loads faster than the
process imports).

    with start_kernel_warmup(config, overrides) as warmup:
        ...                      # the run imports, builds its data and model
        print(warmup.finish())   # as training begins: waits for the process, says what it did
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

# The most training waits for a compiling process: an 8B run's kernels compile in 5-8 s.
WAIT_SECONDS = 60.0
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

        from tuneforge.config.loading import (
            dump_config,  # imported already by whoever built the Config
        )

        source = yaml.safe_load(dump_config(config))
    return {"config": source, "overrides": list(overrides or [])}


class KernelWarmup:
    """The process (None when none was started); `finish` waits for it and says what it did.
    Nothing here raises: without the process, the kernels compile in the first steps as before."""

    def __init__(self, process: subprocess.Popen[bytes] | None = None, folder: Path | None = None) -> None:
        self._process = process
        self._folder = folder
        self._started_at = time.time()

    def finish(self, wait_seconds: float = WAIT_SECONDS) -> str | None:
        """Wait for a compiling process, at most `wait_seconds`, or stop one still setting up;
        the log's line (None: none was started)."""
        if self._process is None or self._folder is None:
            return None
        later = "the kernels compile in the first steps"
        if self._process.poll() is None and not (self._folder / COMPILING).exists():
            ran = time.time() - self._started_at
            self.close()
            return f"{PREFIX} stopped: still importing its libraries {ran:.1f} s after it started; {later}"
        waited = time.perf_counter()
        try:
            code = self._process.wait(timeout=wait_seconds)
        except subprocess.TimeoutExpired:
            self.close()
            return f"{PREFIX} stopped after compiling for {wait_seconds:.0f} s; {later}"
        waited = time.perf_counter() - waited
        report_path = self._folder / REPORT
        if not report_path.exists():
            log = (self._folder / "log.txt").read_text(encoding="utf-8", errors="replace").strip().splitlines()
            self.close()
            return f"{PREFIX} failed (exit code {code}: {log[-1] if log else 'no output'}); {later}"
        report = json.loads(report_path.read_text(encoding="utf-8"))
        self.close()
        if "error" in report:
            return f"{PREFIX} failed ({report['error']}); {later}"
        if "skipped" in report:
            return f"{PREFIX}: {report['skipped']}"
        return (
            f"{PREFIX}: Liger's kernels compiled for {report['shapes']} step shapes in "
            f"{report['compile_seconds']:.1f} s, in a process that ran {report['finished_at'] - self._started_at:.1f} s "
            f"beside loading (training waited {waited:.1f} s for it)"
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
    folder = Path(tempfile.mkdtemp(prefix="tuneforge-kernel-warmup-"))
    (folder / REQUEST).write_text(json.dumps(_request(config, overrides), default=str), encoding="utf-8")
    # The package's own root first, so the process imports this tuneforge whatever the path.
    package_root = str(Path(__file__).resolve().parents[2])
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    with open(folder / "log.txt", "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "tuneforge.train.kernel_compile", str(folder)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=environ,
        )
    return KernelWarmup(process, folder)


__all__ = ["COMPILING", "NVIDIA_DRIVER", "PREFIX", "REPORT", "REQUEST", "WAIT_SECONDS", "KernelWarmup", "start_kernel_warmup", "worth_starting"]
