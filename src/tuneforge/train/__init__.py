"""Train stage: Trainer wiring, callbacks, the run directory and resume.

Exports load lazily, so `import tuneforge` stays light until training is asked for.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "MetricsLogger": "tuneforge.train.callbacks",
    "TrainingProgress": "tuneforge.train.callbacks",
    "RunResult": "tuneforge.train.summary",
    "train": "tuneforge.train.recipe",
    "find_resume_checkpoint": "tuneforge.train.run_dir",
    "prepare_run_dir": "tuneforge.train.run_dir",
    "read_run_metadata": "tuneforge.train.run_dir",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tuneforge.train' has no attribute '{name}'")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


__all__ = sorted(_EXPORTS)
