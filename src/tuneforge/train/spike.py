"""Loss-spike rollback: when a step's loss jumps far above its recent level, go back to the newest
checkpoint and carry on with the next batches.

    class TuneforgeTrainer(NonFiniteGuardMixin, LossSpikeGuardMixin, AtomicCheckpointMixin, Trainer): ...
    trainer = TuneforgeTrainer(..., spike_factor=3.0, spike_window=100, max_rollbacks=3)

A step's loss (its micro-batch losses summed, averaged over the processes: the value
`metrics.jsonl` logs for one step) is a spike when it is more than `spike_factor` times the
median of the last `spike_window` step losses. Nothing is judged until that many steps have
run, so a run starts without a verdict, and a falling loss is never above the median of the
steps before it. The median, unlike a mean, is not dragged up by one bad step.

At the end of a spiking step the guard restores the newest complete checkpoint's weights (or
LoRA adapter), optimizer state and gradient-scaler state with the Trainer's own resume helpers
(`_load_from_checkpoint`, `_load_optimizer_and_scheduler`, `_load_scaler`), and training goes
on with the next batch: the batches of the steps since that checkpoint are skipped, not
replayed, as PaLM did after its spikes (Chowdhery et al. 2022, section 5.1). Replaying them
would often bring the same spike back.

Not rewound: the step counter and the learning-rate schedule. The discarded steps are spent,
like a step the non-finite guard skips, so the run still ends at `max_steps` with the schedule
at its end, and the learning rate after a rollback is the one the step number calls for (not
the lower or higher one the checkpoint held). RNG states are not restored either: with the data
moving on, there is nothing to reproduce.

After a rollback the window starts empty: its losses were measured on the weights just
discarded, and the older weights may have a higher loss on the next batches than they did,
which must not read as a new spike. After `max_rollbacks` rollbacks the next spike stops the
run with a `LossSpikeError`; a spike before the first checkpoint exists is reported and
training goes on with the weights as they are.

With several processes, every rank judges the same rank-averaged loss, and the verdict is
combined once more (one all-reduce of a flag, as the non-finite guard does), so all ranks roll
back at the same step.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Any

import torch
from transformers import (
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)
from transformers.integrations.deepspeed import deepspeed_load_checkpoint
from transformers.trainer import _is_peft_model

from tuneforge.errors import ConfigError, TuneforgeError
from tuneforge.train.checkpoints import good_checkpoints
from tuneforge.train.guards import _any_rank


class LossSpikeError(TuneforgeError):
    """The loss spiked again after the allowed number of rollbacks."""


class SpikeDetector:
    """Judges a step loss against the median of the recent ones.

    Args:
        factor: A loss above `factor` times the median is a spike; more than 1.
        window: How many recent losses the median covers; nothing is judged before it is full.

    Example:
        >>> detector = SpikeDetector(factor=3.0, window=3)
        >>> for loss in (9.0, 4.0, 2.0):
        ...     detector.add(loss)            # a fast fall at the start: only recorded
        >>> detector.median, detector.is_spike(11.9), detector.is_spike(12.1)
        (4.0, False, True)
    """

    def __init__(self, factor: float, window: int) -> None:
        if not factor > 1:
            raise ValueError(f"spike factor must be > 1, got {factor}")
        if window < 1:
            raise ValueError(f"spike window must be >= 1, got {window}")
        self.factor = factor
        self.losses: deque[float] = deque(maxlen=window)

    @property
    def median(self) -> float | None:
        """The median of the window, or None while it is not full."""
        return statistics.median(self.losses) if len(self.losses) == self.losses.maxlen else None

    def is_spike(self, loss: float) -> bool:
        median = self.median
        # A zero median (every recent step had loss 0) gives no scale to compare against.
        return median is not None and median > 0 and loss > self.factor * median

    def add(self, loss: float) -> None:
        self.losses.append(loss)

    def reset(self) -> None:
        self.losses.clear()


def restore_weights_and_optimizer(trainer: Any, checkpoint: str) -> None:
    """Load a checkpoint's weights (or adapter), optimizer and gradient-scaler state into a
    training `Trainer`, through the calls its own resume makes; the learning-rate schedule and
    the learning rate in use are kept."""
    schedule = trainer.lr_scheduler.state_dict()
    rates = [group["lr"] for group in trainer.optimizer.param_groups]
    # The same engine dispatch as Trainer._prepare_for_training's resume: DeepSpeed loads its own
    # checkpoint format, FSDP loads into the wrapped (sharded) model, the rest into `model`.
    # Every call copies into the existing parameters, so the optimizer still holds them.
    if trainer.is_deepspeed_enabled:
        deepspeed_load_checkpoint(trainer.model_wrapped, checkpoint, load_module_strict=not _is_peft_model(trainer.model))
    elif trainer.is_fsdp_enabled:
        trainer._load_from_checkpoint(checkpoint, trainer.model_wrapped)
    else:
        trainer._load_from_checkpoint(checkpoint)
    trainer._load_optimizer_and_scheduler(checkpoint)
    trainer._load_scaler(checkpoint)
    # Loading the optimizer also brought back the checkpoint's learning rate in its param
    # groups; the schedule is not rewound, so both go back to where the step count has them.
    trainer.lr_scheduler.load_state_dict(schedule)
    for group, rate in zip(trainer.optimizer.param_groups, rates):
        group["lr"] = rate


def _mean_over_ranks(loss: torch.Tensor) -> float:
    """The loss averaged over processes: each rank's share depends on how many of the step's
    trained tokens it holds, so only the average is comparable from step to step."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        loss = loss.clone()
        torch.distributed.all_reduce(loss, op=torch.distributed.ReduceOp.SUM)
        loss /= torch.distributed.get_world_size()
    return float(loss.item())


class LossSpikeGuard(TrainerCallback):
    """Rolls a `Trainer` back to its newest complete checkpoint when a step's loss spikes.

    Fed every micro-batch loss by `LossSpikeGuardMixin` (`observe`); see the module docstring.

    Args:
        trainer: The Trainer to restore (its resume helpers do the loading).
        factor: A step loss above `factor` times the recent median is a spike.
        window: How many recent step losses the median covers.
        max_rollbacks: Rollbacks allowed over the run; the next spike raises. 0: stop at the first.

    Attributes:
        rollbacks: The (1-based) steps at which the run was rolled back, as `metrics.jsonl` numbers them.

    Raises:
        ConfigError: the Trainer saves checkpoints without optimizer state (`save_only_model`).
    """

    def __init__(self, trainer: Any, factor: float, window: int, max_rollbacks: int) -> None:
        if max_rollbacks < 0:
            raise ValueError(f"max_rollbacks must be >= 0, got {max_rollbacks}")
        if trainer.args.save_only_model:
            raise ConfigError(
                "rolling back after a loss spike restores the optimizer state, but checkpoints saved "
                "with train.save_only_model hold none",
                where="guards.spike_factor",
                hint="set train.save_only_model: false, or turn the guard off with guards.spike_factor: null",
            )
        self.trainer = trainer
        self.detector = SpikeDetector(factor, window)
        self.max_rollbacks = max_rollbacks
        self.rollbacks: list[int] = []
        self._step_loss: torch.Tensor | None = None

    def observe(self, loss: torch.Tensor) -> None:
        """Add one micro-batch's loss (as `training_step` returns it) to the step's."""
        loss = loss.detach().float()
        self._step_loss = loss if self._step_loss is None else self._step_loss + loss

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._step_loss = None

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        # Every rank takes part in both collectives at every step, whatever its own loss was.
        local = self._step_loss if self._step_loss is not None else torch.tensor(math.nan, device=args.device)
        loss = _mean_over_ranks(local)
        # A NaN or inf loss is the non-finite guard's to handle; it says nothing about the level.
        spike = math.isfinite(loss) and self.detector.is_spike(loss)
        if not _any_rank(spike, local.device):
            if math.isfinite(loss):
                self.detector.add(loss)
            return
        self._roll_back(args, state, loss)

    def _describe(self, loss: float) -> str:
        median, factor = self.detector.median, self.detector.factor
        if median is None or median <= 0:  # only when another rank's rounding called it a spike
            return f"loss {loss:.4g} (guards.spike_factor {factor:g})"
        return (
            f"loss {loss:.4g} is {loss / median:.1f}x the median {median:.4g} of the last "
            f"{len(self.detector.losses)} steps (guards.spike_factor {factor:g})"
        )

    def _roll_back(self, args: TrainingArguments, state: TrainerState, loss: float) -> None:
        step, spike = state.global_step, self._describe(loss)
        found = good_checkpoints(args.output_dir)
        if len(self.rollbacks) >= self.max_rollbacks:
            raise self._error(step, spike, str(found[-1][1]) if found else None)
        if not found:
            if state.is_world_process_zero:
                print(
                    f"[tuneforge] step {step}: loss spike: {spike}; no checkpoint to roll back "
                    "to yet, so training goes on with the weights as they are",
                    flush=True,
                )
            self.detector.add(loss)  # the step is kept, so its loss is part of the recent level
            return
        saved_step, checkpoint = found[-1]
        restore_weights_and_optimizer(self.trainer, str(checkpoint))
        self.rollbacks.append(step)
        self.detector.reset()
        if state.is_world_process_zero:
            skipped = f"step {step}" if saved_step + 1 == step else f"steps {saved_step + 1}-{step}"
            print(
                f"[tuneforge] step {step}: loss spike: {spike}; rolled back to {checkpoint} "
                f"(weights and optimizer state) and went on with the next batch: the batches of {skipped} are "
                f"skipped, the learning-rate schedule stays at step {step} "
                f"(rollback {len(self.rollbacks)} of {self.max_rollbacks} allowed by guards.max_rollbacks)",
                flush=True,
            )

    def _error(self, step: int, spike: str, checkpoint: str | None) -> LossSpikeError:
        done = (
            f"the run was already rolled back {len(self.rollbacks)} time(s) (at steps "
            f"{', '.join(map(str, self.rollbacks))})" if self.rollbacks else "no rollback was allowed"
        )
        kept = (
            f"the newest checkpoint, {checkpoint}, holds weights from before this spike"
            if checkpoint is not None
            else "no checkpoint was written yet"
        )
        return LossSpikeError(
            f"loss spike: {spike}; {done}, and guards.max_rollbacks is {self.max_rollbacks}; {kept}",
            where=f"step {step}",
            hint="the loss keeps jumping: lower train.learning_rate, set train.max_grad_norm or a longer "
            "train.warmup_steps, check the data of these steps, or allow more with guards.max_rollbacks",
        )


class LossSpikeGuardMixin:
    """Adds a `LossSpikeGuard` to a `transformers.Trainer` subclass when `spike_factor` is set.

    Put it before `Trainer` and after `NonFiniteGuardMixin` in the bases, so it sees each raw
    micro-batch loss (that mixin may hand the Trainer a zero in place of a NaN). It takes three
    extra keywords: `spike_factor` (None: no guard, no cost), `spike_window`, `max_rollbacks`.
    """

    def __init__(
        self, *args: Any, spike_factor: float | None = None, spike_window: int = 100, max_rollbacks: int = 3,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.spike_guard: LossSpikeGuard | None = None
        if spike_factor is not None:
            self.spike_guard = LossSpikeGuard(self, spike_factor, spike_window, max_rollbacks)
            self.add_callback(self.spike_guard)  # type: ignore[attr-defined]

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)  # type: ignore[misc]
        if self.spike_guard is not None:
            self.spike_guard.observe(loss)
        return loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self.spike_guard is not None and self.spike_guard.rollbacks and "loss" in logs:
            logs["rollbacks"] = len(self.spike_guard.rollbacks)
        super().log(logs, *args, **kwargs)  # type: ignore[misc]


def count_rollbacks(trainer: Any) -> int:
    """How many times a trainer's loss-spike guard rolled back (0 without a guard)."""
    guard = getattr(trainer, "spike_guard", None)
    return len(guard.rollbacks) if guard is not None else 0


__all__ = [
    "LossSpikeError",
    "LossSpikeGuard",
    "LossSpikeGuardMixin",
    "SpikeDetector",
    "count_rollbacks",
    "restore_weights_and_optimizer",
]
