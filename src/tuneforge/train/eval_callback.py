"""Run the config's `eval.tasks` whenever the Trainer evaluates, and log their metrics.

    eval:
      tasks:
        - {name: jcqa, type: multiple_choice, data: {path: valid.json, format: multiple_choice, max_rows: 200}}
    train:
      metric_for_best_model: eval_jcqa_accuracy

The metrics join the evaluation's own (`eval_loss`, ...): `on_evaluate` receives the dict that
`Trainer.evaluate` returns and that best-model selection reads, so they are added to it in
place. The Trainer has already logged that dict by then, so they are logged again on their own
(to `metrics.jsonl` and any reporting integration).
"""

from __future__ import annotations

from typing import Any

from transformers import (
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from tuneforge.config.schema import EvalTask
from tuneforge.data.templates import Template
from tuneforge.infer.evaluate import run_task
from tuneforge.infer.generate import LoadedModel


class EvalTasksCallback(TrainerCallback):
    """Adds `eval_<task>_<metric>` for each task to every evaluation's metrics."""

    def __init__(self, trainer: Trainer, tasks: list[EvalTask], template: Template | None) -> None:
        self.trainer = trainer
        self.tasks = tasks
        self.template = template

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        loaded = LoadedModel(self.trainer.model, self.trainer.processing_class, self.template, "training")
        added = {
            f"eval_{task.key}_{name}": value
            for task in self.tasks
            for name, value in run_task(loaded, task).metrics.items()
        }
        if metrics is not None:
            metrics.update(added)
        self.trainer.log(added)


__all__ = ["EvalTasksCallback"]
