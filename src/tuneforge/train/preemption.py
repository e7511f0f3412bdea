"""Preemption: on SIGTERM or SIGUSR1, save a checkpoint at the next step boundary and stop.

Schedulers warn before they kill: SLURM sends SIGTERM (and SIGUSR1 with
`#SBATCH --signal=USR1@120`, which must not carry `B:` so it reaches this process, not only
the batch shell), PBS and Kubernetes send SIGTERM. The signal handler only sets a flag;
`PreemptionCallback` acts on it when the current optimizer step ends: it saves
`checkpoint-<step>` (atomically, see `checkpoints.py`), stops training and skips evaluation.
`train()` then raises `TrainingPreempted`, and `tuneforge train` exits with
`PREEMPTED_EXIT_CODE` (0). Running the same command with `output.resume=auto` continues from
that checkpoint with the losses an uninterrupted run would have had.

    with install_preemption_handlers() as preemption:
        trainer = TuneforgeTrainer(..., callbacks=[preemption])
        trainer.train()
    raise_if_preempted(trainer)

Exit code 0: PITFALLS 16 asks for it. The job did not fail, and a scheduler's own requeue
(SLURM `--requeue` on preemption, `scontrol requeue` from a trap) does not depend on the
exit code, while a non-zero code would trigger failure mails and `afterany`-style cleanups.
The message on stderr and the absence of `model/` tell a finished run from a preempted one.

A second signal while the first is pending falls back to the handler that was installed
before (by default: terminate now); atomic checkpoints make that safe.

With several processes, every rank's flag is combined at each step end (one all-reduce of a
single integer), so all ranks stop and save at the same step even if the signal reached
only some of them. A step end's vote is read at the next step end, from a copy the GPU made
as soon as the all-reduce ended: read at once, it would wait for the whole step's kernels and
leave the GPU without work at every step. So several processes stop one step after the signal.
"""

from __future__ import annotations

import signal
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from transformers import (
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from tuneforge.train.deferred import DeferredValue

PREEMPTED_EXIT_CODE = 0
PREEMPTION_SIGNALS: tuple[signal.Signals, ...] = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name)
)


class TrainingPreempted(Exception):
    """Training stopped early on a scheduler's signal, after saving a checkpoint.

    Not a `TuneforgeError`: nothing is wrong, the run is to be continued with `output.resume=auto`.
    """

    def __init__(self, signal_name: str, step: int, checkpoint: str | None) -> None:
        self.signal_name = signal_name
        self.step = step
        self.checkpoint = checkpoint
        saved = f"checkpoint saved to {checkpoint}" if checkpoint else "no checkpoint was saved"
        super().__init__(
            f"stopped by {signal_name} at step {step}; {saved}. "
            "Run the same command with output.resume=auto to continue."
        )


class PreemptionCallback(TrainerCallback):
    """Saves and stops at the first step end after `request()` (called by the signal handler)."""

    def __init__(self) -> None:
        self.signal_number: int | None = None
        self.stopped_at: int | None = None
        self.checkpoint: str | None = None
        self._vote: DeferredValue | None = None  # the ranks' vote at the last step end, not yet read

    def request(self, signal_number: int) -> None:
        self.signal_number = signal_number

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signal_number).name if self.signal_number is not None else "request"

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.stopped_at is not None or not self._stop_now(args):
            return
        if state.global_step >= state.max_steps:
            return  # the last step: the run finishes normally
        self.stopped_at = state.global_step
        control.should_save = True
        control.should_training_stop = True
        control.should_evaluate = False  # the grace period is short: save first, and only save
        if state.is_world_process_zero:
            print(f"[tuneforge] {self.signal_name}: saving a checkpoint at step {state.global_step} and stopping",
                  flush=True)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.stopped_at == state.global_step:
            self.checkpoint = str(Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.stopped_at is not None:
            # Trainer runs an epoch end after breaking out; the checkpoint is already written.
            control.should_save = control.should_evaluate = False


    def _stop_now(self, args: TrainingArguments) -> bool:
        """One process: whether it was signalled. Several: whether any rank was, by the vote of the
        previous step end (every rank reads the same vote at the same step); this step end's vote
        is queued. All ranks call this at every step end."""
        flag = self.signal_number is not None
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()) or torch.distributed.get_world_size() == 1:
            return flag
        previous, self._vote = self._vote, None
        # A fill, not `torch.tensor([flag], device=...)`: a copy from host memory waits for the GPU.
        vote = torch.full((1,), int(flag), device=args.device)
        torch.distributed.all_reduce(vote, op=torch.distributed.ReduceOp.MAX)
        self._vote = DeferredValue.of(vote)
        return previous is not None and bool(previous.get().item())


@contextmanager
def install_preemption_handlers(
    callback: PreemptionCallback | None = None,
    signals: tuple[signal.Signals, ...] = PREEMPTION_SIGNALS,
) -> Iterator[PreemptionCallback]:
    """Route `signals` to a `PreemptionCallback` while the block runs; restore the old handlers after.

    Yields:
        The callback to pass to the Trainer.
    """
    callback = callback or PreemptionCallback()
    if threading.current_thread() is not threading.main_thread():
        warnings.warn("training outside the main thread: preemption signals are not handled", stacklevel=3)
        yield callback
        return
    previous = {number: signal.getsignal(number) for number in signals}

    def handle(number: int, frame: FrameType | None) -> None:
        # Only set a flag: the handler may run in the middle of any Python line, even a write.
        if callback.signal_number is None:
            callback.request(number)
            return
        signal.signal(number, _restorable(previous[number]))
        signal.raise_signal(number)

    for number in signals:
        signal.signal(number, handle)
    try:
        yield callback
    finally:
        for number, handler in previous.items():
            signal.signal(number, _restorable(handler))


def _restorable(handler: Any) -> Any:
    # getsignal gives None for a handler not installed from Python; the default is the closest.
    return signal.SIG_DFL if handler is None else handler


def raise_if_preempted(trainer: Trainer) -> None:
    """After `trainer.train()` returned: raise if it stopped on a signal rather than finishing.

    Raises:
        TrainingPreempted: with the signal, the step and the checkpoint written.
    """
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, PreemptionCallback) and callback.stopped_at is not None:
            raise TrainingPreempted(callback.signal_name, callback.stopped_at, callback.checkpoint)


__all__ = [
    "PREEMPTED_EXIT_CODE",
    "PREEMPTION_SIGNALS",
    "PreemptionCallback",
    "TrainingPreempted",
    "install_preemption_handlers",
    "raise_if_preempted",
]
