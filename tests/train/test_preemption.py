"""Preemption (PITFALLS 16): a real SIGTERM saves at the next step and exits 0; SIGKILL loses
at most the steps since the last complete checkpoint; either way resuming with
output.resume=auto gives the losses of an uninterrupted run, step for step."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from transformers import TrainerControl, TrainerState, TrainingArguments

import tuneforge
from tests.conftest import successor_rows, write_jsonl
from tuneforge.train import train
from tuneforge.train.checkpoints import find_good_checkpoint, is_complete_checkpoint
from tuneforge.train.preemption import (
    PREEMPTED_EXIT_CODE,
    PreemptionCallback,
    install_preemption_handlers,
)

MAX_STEPS = 40  # long enough that the signal lands mid-run on a slow shared CPU


def write_config(tmp_path: Path, model_dir: Path, name: str, **train_args) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "train.jsonl"
    if not data.exists():
        write_jsonl(data, successor_rows(80))
    settings = {
        "learning_rate": 3e-3, "per_device_train_batch_size": 16, "max_steps": MAX_STEPS,
        "logging_steps": 1, "save_strategy": "no", "use_cpu": True,
    }
    settings.update(train_args)
    config = {
        "model": {"path": str(model_dir)},
        "data": {
            "datasets": [{"path": str(data), "prompt_fields": ["question"], "response_field": "answer"}],
            "eval_split": 0.2,
            "max_length": 32,
        },
        "train": settings,
        "output": {"dir": str(tmp_path / name)},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def losses_by_step(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {record["step"]: record["loss"] for record in map(json.loads, lines) if "loss" in record}


def start_training(config: Path, *overrides: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(Path(tuneforge.__file__).parents[1]))
    return subprocess.Popen(
        [sys.executable, "-m", "tuneforge.cli.main", "train", str(config), *overrides],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def wait_until(process: subprocess.Popen, ready, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None:
            pytest.fail(f"training ended (exit {process.returncode}) before the signal:\n{process.stdout.read()}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("training never got far enough to be interrupted")
        time.sleep(0.02)


def logged_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    return max((json.loads(line).get("step", 0) for line in path.read_text().splitlines() if line.strip()), default=0)


def resume_and_compare(config: Path, run_dir: Path, checkpoint: str, uninterrupted: dict[int, float]) -> None:
    """Restart with output.resume=auto: it resumes from `checkpoint` and logs the uninterrupted losses."""
    resumed = start_training(config, "output.resume=auto")
    output, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, output
    assert f"resuming from {checkpoint}" in output
    losses = losses_by_step(run_dir)
    assert sorted(losses) == list(range(1, MAX_STEPS + 1))
    assert [losses[s] for s in sorted(losses)] == pytest.approx([uninterrupted[s] for s in sorted(losses)], rel=1e-5)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir) -> dict[int, float]:
    tmp_path = tmp_path_factory.mktemp("uninterrupted")
    result = train(str(write_config(tmp_path, tiny_model_dir, "run")))
    losses = losses_by_step(result.run_dir)
    assert sorted(losses) == list(range(1, MAX_STEPS + 1))
    return losses


def test_sigterm_saves_at_the_next_step_exits_0_and_resume_matches(tmp_path, tiny_model_dir, uninterrupted):
    config = write_config(tmp_path, tiny_model_dir, "run")
    run_dir = tmp_path / "run"
    process = start_training(config)
    wait_until(process, lambda: logged_step(run_dir) >= 3)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == PREEMPTED_EXIT_CODE, output
    stopped = logged_step(run_dir)
    assert 3 <= stopped < MAX_STEPS, output
    checkpoint = run_dir / f"checkpoint-{stopped}"
    assert find_good_checkpoint(run_dir) == str(checkpoint) and is_complete_checkpoint(checkpoint)
    assert f"stopped by SIGTERM at step {stopped}" in output and "output.resume=auto" in output
    assert not (run_dir / "model").exists()  # a preempted run does not look finished

    resume_and_compare(config, run_dir, str(checkpoint), uninterrupted)


def test_sigkill_resumes_from_the_last_complete_checkpoint_with_the_same_losses(tmp_path, tiny_model_dir, uninterrupted):
    config = write_config(tmp_path, tiny_model_dir, "run", save_strategy="steps", save_steps=3, save_total_limit=2)
    run_dir = tmp_path / "run"
    process = start_training(config)
    wait_until(process, lambda: find_good_checkpoint(run_dir) is not None and logged_step(run_dir) >= 7)
    process.kill()  # SIGKILL: no handler runs, possibly in the middle of a save
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    last_good = find_good_checkpoint(run_dir)
    assert last_good is not None

    resume_and_compare(config, run_dir, last_good, uninterrupted)


def test_handlers_route_signals_to_the_callback_and_are_restored():
    before_term, before_usr1 = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)
    with install_preemption_handlers() as preemption:
        assert preemption.signal_number is None
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.01)  # Python runs the handler at the next bytecode boundary
        assert preemption.signal_name == "SIGUSR1"
    assert signal.getsignal(signal.SIGTERM) is before_term and signal.getsignal(signal.SIGUSR1) is before_usr1


def test_callback_saves_and_stops_at_the_step_boundary_but_lets_the_last_step_finish(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    callback = PreemptionCallback()
    state, control = TrainerState(global_step=5, max_steps=10), TrainerControl(should_evaluate=True)
    callback.on_step_end(args, state, control)
    assert not control.should_save and not control.should_training_stop  # no signal yet
    callback.request(signal.SIGTERM)
    callback.on_step_end(args, state, control)
    assert control.should_save and control.should_training_stop and not control.should_evaluate
    callback.on_save(args, state, control)
    assert callback.checkpoint == str(tmp_path / "checkpoint-5")

    last = PreemptionCallback()
    last.request(signal.SIGTERM)
    done, control = TrainerState(global_step=10, max_steps=10), TrainerControl()
    last.on_step_end(args, done, control)
    assert last.stopped_at is None and not control.should_training_stop
