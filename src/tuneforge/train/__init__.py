"""Train stage: Trainer wiring, callbacks, the run directory and resume."""

from tuneforge.train.callbacks import MetricsLogger, TrainingProgress
from tuneforge.train.recipe import RunResult, train
from tuneforge.train.run_dir import find_resume_checkpoint, prepare_run_dir, read_run_metadata

__all__ = [
    "MetricsLogger",
    "RunResult",
    "TrainingProgress",
    "find_resume_checkpoint",
    "prepare_run_dir",
    "read_run_metadata",
    "train",
]
