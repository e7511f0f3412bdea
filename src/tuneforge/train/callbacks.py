"""Trainer callbacks: metrics.jsonl with throughput, MFU and GPU memory, and a progress bar people can read."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import (
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from tuneforge.train.layer_graphs import peak_memory_allocated


class MetricsLogger(TrainerCallback):
    """Adds `tokens_per_second`, `elapsed_seconds` and, on a GPU, `mfu` (model FLOPs utilisation
    against `peak_tflops`) and `gpu_memory_gib` (peak allocated, with the memory of captured CUDA graphs,
    `layer_graphs.peak_memory_allocated`) to each
    training log, and appends every log to `metrics.jsonl`. The Trainer passes the same dict on
    to its reporting integrations (TensorBoard, wandb, MLflow), so they get these too.

    Runs before the progress bar so the bar shows what it computes.
    """

    def __init__(self, path: Path, flops_per_token: float | None = None, peak_tflops: float | None = None) -> None:
        self.path = path
        self.flops_per_token = flops_per_token
        self.peak_tflops = peak_tflops
        self._started: float | None = None
        self._last_time: float | None = None
        self._last_tokens = 0
        self.tokens_at_start = 0

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._started = self._last_time = time.perf_counter()
        self._last_tokens = state.num_input_tokens_seen
        self.tokens_at_start = state.num_input_tokens_seen

    def _add_rates(self, args: TrainingArguments, logs: dict[str, Any], tokens: int, elapsed: float) -> None:
        rate = tokens / elapsed
        logs["tokens_per_second"] = round(rate, 1)
        if self.flops_per_token and self.peak_tflops:
            # num_input_tokens_seen counts every process's tokens; MFU is per GPU.
            logs["mfu"] = round(rate / max(args.world_size, 1) * self.flops_per_token / (self.peak_tflops * 1e12), 4)

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
                self._add_rates(args, logs, tokens, elapsed)
            self._last_time, self._last_tokens = now, state.num_input_tokens_seen
            if torch.cuda.is_available():
                logs["gpu_memory_gib"] = round(peak_memory_allocated() / 2**30, 2)
        if self._started is not None:
            logs["elapsed_seconds"] = round(now - self._started, 2)
        if state.is_world_process_zero:
            record = {"step": state.global_step, **logs}
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")


def report_after_metrics(trainer: Any) -> None:
    """Move the reporting integrations (TensorBoard, wandb, MLflow: transformers adds them first)
    behind MetricsLogger, so they receive the throughput, MFU and memory it adds to each log."""
    handler = trainer.callback_handler
    reporters = [cb for cb in handler.callbacks if type(cb).__module__.startswith("transformers.integrations")]
    handler.callbacks = [cb for cb in handler.callbacks if cb not in reporters] + reporters


class TrainingProgress(TrainerCallback):
    """One bar for the whole run: step, ETA, and the latest loss, learning rate, tokens/s, MFU and
    GPU memory (as MetricsLogger computed them)."""

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
            if "mfu" in logs:
                postfix["mfu"] = f"{logs['mfu']:.1%}"
            if "gpu_memory_gib" in logs:
                postfix["mem"] = f"{logs['gpu_memory_gib']:.1f}GiB"
            self.bar.set_postfix(postfix, refresh=True)
        elif "eval_loss" in logs:
            self.bar.write(f"step {state.global_step}: eval_loss {logs['eval_loss']:.4f}")

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


__all__ = ["MetricsLogger", "TrainingProgress", "report_after_metrics"]
