"""Trainer callbacks: metrics.jsonl with throughput, and a progress bar people can read."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm
from transformers import (
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)


class MetricsLogger(TrainerCallback):
    """Adds `tokens_per_second` to each training log and appends every log to `metrics.jsonl`.

    Runs before the progress bar so the bar shows the throughput it computes.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._last_time: float | None = None
        self._last_tokens = 0
        self.tokens_at_start = 0

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._last_time = time.perf_counter()
        self._last_tokens = state.num_input_tokens_seen
        self.tokens_at_start = state.num_input_tokens_seen

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if logs is None:
            return
        now = time.perf_counter()
        if "loss" in logs and self._last_time is not None:
            tokens = state.num_input_tokens_seen - self._last_tokens
            elapsed = now - self._last_time
            if tokens > 0 and elapsed > 0:
                logs["tokens_per_second"] = round(tokens / elapsed, 1)
            self._last_time, self._last_tokens = now, state.num_input_tokens_seen
        if state.is_world_process_zero:
            record = {"step": state.global_step, **logs}
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")


class TrainingProgress(TrainerCallback):
    """One bar for the whole run: step, ETA, and the latest loss, learning rate and tokens/s."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", dynamic_ncols=True)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if self.bar is None or not logs:
            return
        if "loss" in logs:
            postfix = {"loss": f"{logs['loss']:.4f}"}
            if "learning_rate" in logs:
                postfix["lr"] = f"{logs['learning_rate']:.2e}"
            if "tokens_per_second" in logs:
                postfix["tok/s"] = f"{logs['tokens_per_second']:,.0f}"
            self.bar.set_postfix(postfix, refresh=True)
        elif "eval_loss" in logs:
            self.bar.write(f"step {state.global_step}: eval_loss {logs['eval_loss']:.4f}")

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


__all__ = ["MetricsLogger", "TrainingProgress"]
