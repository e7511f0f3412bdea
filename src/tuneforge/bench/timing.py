"""One timer for every system in a benchmark: a `TrainerCallback`, so tuneforge, plain Hugging Face,
TRL and Unsloth (all of which train through `transformers.Trainer`) are measured the same way.

Each optimizer step is timed on the GPU, by CUDA events recorded as it begins and read once
training has ended: a step runs from its start on the GPU to the next step's start (the last one
to its end), so the steps tile the GPU's timeline, the host's work between them included, and the
timer adds no synchronisation that a user's run would not have. Its tokens are the change of
`state.num_input_tokens_seen`, which the Trainer counts without padding
(`include_num_input_tokens_seen="non_padding"`). This module imports only torch, transformers and
`train/layer_graphs` (torch alone at import, for the graph pool's memory): it runs inside peer
environments too.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from tuneforge.train.layer_graphs import peak_memory_allocated, reset_peak_memory

GIB = 2**30


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _mark() -> torch.cuda.Event | float:
    """A point in the GPU's queue (a CUDA event), or the host's clock without a GPU."""
    if not torch.cuda.is_available():
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def _seconds(start: torch.cuda.Event | float, end: torch.cuda.Event | float) -> float:
    if isinstance(start, float) and isinstance(end, float):
        return end - start
    return start.elapsed_time(end) / 1000  # type: ignore[union-attr,arg-type]


class StepTimer(TrainerCallback):
    """Records (seconds, tokens, loss) per optimizer step and the run's peak GPU memory.

    A timer that synchronised at each step's start and end (this one until 2026-12-01) emptied the
    GPU's queue there: a system whose host launches the next step while the GPU still runs the last
    one lost that lead in every timed step, as no real run does."""

    def __init__(self) -> None:
        self.steps: list[tuple[float, int]] = []  # filled when training ends
        self.losses: list[float] = []
        self._starts: list[torch.cuda.Event | float] = []
        self._end: torch.cuda.Event | float | None = None
        self._tokens: list[int] = []
        self._tokens_before = 0
        self._train_started = 0.0
        self.train_seconds = 0.0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if torch.cuda.is_available():
            reset_peak_memory()
        _sync()
        self._train_started = time.perf_counter()

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._starts.append(_mark())
        self._tokens_before = state.num_input_tokens_seen

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._end = _mark()
        self._tokens.append(state.num_input_tokens_seen - self._tokens_before)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        _sync()
        self.train_seconds = time.perf_counter() - self._train_started
        bounds = [*self._starts[: len(self._tokens)], self._end]
        self.steps = [(_seconds(start, end), tokens) for start, end, tokens in zip(bounds, bounds[1:], self._tokens)]

    def result(self, warmup: int, left_out: tuple[int, float] | None = None) -> dict[str, Any]:
        """Median tokens/s of the steps after `warmup`, whole-run tokens/s, peak memory, losses.

        `left_out`: (step number, seconds) of a step that no figure counts, with the wall time it
        and any work after it took (a profiled step: the profiler slows it and then writes its
        trace)."""
        skipped, skipped_seconds = left_out or (0, 0.0)
        counted = [step for number, step in enumerate(self.steps, start=1) if number != skipped]
        measured = [step for number, step in enumerate(self.steps, start=1) if number > warmup and number != skipped] or counted
        rates = [tokens / seconds for seconds, tokens in measured if seconds > 0]
        counted_tokens = sum(tokens for _, tokens in counted)
        run_seconds = self.train_seconds - skipped_seconds
        # Where a whole-run rate loses to the median: the first steps (kernel compilation, cuBLAS
        # and allocator warm-up) and the time outside any step (loader start, epoch boundaries).
        warmup_seconds = [seconds for number, (seconds, _) in enumerate(self.steps, start=1) if number <= warmup and number != skipped]
        return {
            "steps": len(self.steps),
            "tokens_per_s_median": statistics.median(rates) if rates else None,
            "tokens_per_s_run": counted_tokens / run_seconds if run_seconds > 0 else None,
            "step_seconds_median": statistics.median(seconds for seconds, _ in measured) if measured else None,
            "tokens": sum(tokens for _, tokens in self.steps),
            "train_seconds": self.train_seconds,
            "run_seconds": run_seconds,  # what the whole-run rate divides by
            "warmup_steps": warmup,
            "warmup_step_seconds": sum(warmup_seconds),
            "seconds_outside_steps": run_seconds - sum(seconds for seconds, _ in counted),
            # Every step, to see where a whole-run rate lost against the median (the profiled
            # step included, as measured).
            "step_seconds": [round(seconds, 4) for seconds, _ in self.steps],
            "peak_gib": peak_memory_allocated() / GIB if torch.cuda.is_available() else None,
            "loss_first": self.losses[0] if self.losses else None,
            "loss_last": self.losses[-1] if self.losses else None,
        }


def write_result(path: str | Path, result: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")


__all__ = ["StepTimer", "write_result"]
