"""A stall watchdog: when no optimizer step finishes for `guards.stall_minutes`, every process
prints the Python stack of each of its threads to stderr (PITFALLS 16: hangs give no diagnosis).

A rank stuck in a collective, a dataloader worker that died, a deadlocked barrier: each process
arms `faulthandler`'s timer at every step end, so the one that stopped making progress, and
every rank waiting on it, shows where it is. The dump repeats each period while the stall lasts;
nothing is killed (the collective timeout, `distributed.timeout_minutes`, ends a real hang).
`faulthandler` runs its timer in a C thread, so it fires even while Python code holds the GIL.
"""

from __future__ import annotations

import faulthandler
import sys
from typing import Any

from transformers import TrainerCallback


class StallWatchdog(TrainerCallback):
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def _arm(self) -> None:
        faulthandler.cancel_dump_traceback_later()
        stream = _stderr_with_descriptor()
        if stream is not None:
            faulthandler.dump_traceback_later(self.seconds, repeat=True, file=stream)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._arm()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._arm()

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._arm()  # a long evaluation is progress too

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        faulthandler.cancel_dump_traceback_later()


def _stderr_with_descriptor() -> Any:
    """faulthandler writes to a file descriptor: stderr, or the process's own one when stderr is
    replaced by an in-memory stream (a notebook, a captured test)."""
    for stream in (sys.stderr, sys.__stderr__):
        try:
            stream.fileno()
        except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both
            continue
        return stream
    return None


__all__ = ["StallWatchdog"]
