"""The stall watchdog (PITFALLS 16): a process that makes no progress prints where it is stuck."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import tuneforge

SCRIPT = textwrap.dedent(
    """
    import time
    from tuneforge.train.watchdog import StallWatchdog

    watchdog = StallWatchdog(seconds=0.5)

    def stuck_in_a_collective():
        time.sleep(1.3)

    def training_step_that_finishes_in_time():
        time.sleep(0.2)

    watchdog.on_train_begin(None, None, None)
    for _ in range(3):
        training_step_that_finishes_in_time()
        watchdog.on_step_end(None, None, None)  # progress re-arms the timer
    {last}
    watchdog.on_train_end(None, None, None)
    time.sleep(0.8)  # after the run ends nothing is dumped
    print("done", flush=True)
    """
)


def run(last: str) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(Path(tuneforge.__file__).parents[1])}
    return subprocess.run(
        [sys.executable, "-c", SCRIPT.format(last=last)], capture_output=True, text=True, timeout=60, env=env, check=False
    )


def test_a_stalled_step_dumps_the_stack_where_it_is_stuck():
    result = run("stuck_in_a_collective()")
    assert result.returncode == 0 and result.stdout.strip() == "done", result.stderr
    assert "stuck_in_a_collective" in result.stderr
    # Normally twice (0.5 s and 1.0 s into the 1.3 s stall); at least once on a loaded machine.
    assert result.stderr.count("Timeout (0:00:00.500000)!") >= 1
    assert "training_step_that_finishes_in_time" not in result.stderr


def test_steps_that_keep_finishing_never_dump():
    result = run("training_step_that_finishes_in_time()")
    assert result.returncode == 0 and result.stdout.strip() == "done"
    assert "Timeout" not in result.stderr
