"""Atomic checkpoints (PITFALLS 15): a failed save leaves the previous checkpoint intact and
resumable, rotation orders by step number, incomplete directories are never resumed from."""

import json
import os

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Trainer,
    TrainingArguments,
    default_data_collator,
)
from transformers.trainer_utils import get_last_checkpoint

from tuneforge.train import checkpoints
from tuneforge.train.checkpoints import (
    AtomicCheckpointMixin,
    CheckpointSpaceError,
    find_good_checkpoint,
    is_complete_checkpoint,
    rotate_checkpoints,
    write_manifest,
)


class AtomicTrainer(AtomicCheckpointMixin, Trainer):
    pass


def rows(count: int = 24, length: int = 12) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 200, (count, length), generator=generator)
    return [{"input_ids": row, "labels": row} for row in ids]


def make_trainer(model_dir, output_dir, **overrides) -> AtomicTrainer:
    settings = dict(
        output_dir=str(output_dir), max_steps=6, per_device_train_batch_size=4, learning_rate=3e-3,
        logging_steps=1, save_strategy="steps", save_steps=2, use_cpu=True, report_to=[],
        disable_tqdm=True, seed=0,
    )
    settings.update(overrides)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    data = rows()
    return AtomicTrainer(
        model=model, args=TrainingArguments(**settings), train_dataset=data, eval_dataset=data[:8],
        data_collator=default_data_collator,
    )


def losses(trainer: Trainer) -> dict[int, float]:
    return {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}


def fake_checkpoint(run_dir, step: int, complete: bool = True, mtime: float | None = None):
    path = run_dir / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"x" * 64)
    if complete:
        write_manifest(path, step)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def test_a_failed_save_keeps_the_previous_checkpoint_and_resume_picks_it(tmp_path, tiny_model_dir, monkeypatch):
    straight = make_trainer(tiny_model_dir, tmp_path / "straight")
    straight.train()
    assert sorted(p.name for p in (tmp_path / "straight").iterdir()) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]

    real_save_rng_state = Trainer._save_rng_state

    def fail_at_step_4(self, output_dir):
        if output_dir.endswith("checkpoint-4"):
            raise OSError("disk went away mid-save")  # weights and optimizer are written by now
        real_save_rng_state(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", fail_at_step_4)
    run = tmp_path / "run"
    with pytest.raises(OSError, match="mid-save"):
        make_trainer(tiny_model_dir, run).train()
    monkeypatch.undo()

    assert not (run / "checkpoint-4").exists()
    assert (run / ".partial-checkpoint-4" / "checkpoint-4" / "model.safetensors").exists()  # half-written
    assert is_complete_checkpoint(run / "checkpoint-2")
    assert find_good_checkpoint(run) == str(run / "checkpoint-2")
    assert get_last_checkpoint(str(run)) == str(run / "checkpoint-2")  # plain HF resume is safe too

    resumed = make_trainer(tiny_model_dir, run)
    resumed.train(resume_from_checkpoint=find_good_checkpoint(run))
    assert resumed.state.global_step == 6
    assert not (run / ".partial-checkpoint-4").exists()  # the leftover is cleaned at the next save
    # Steps 1-2 come from the checkpoint's log history, 3-6 were trained again after resuming.
    assert losses(resumed) == pytest.approx(losses(straight), rel=1e-5)


def test_rotation_during_training_keeps_the_newest_complete_checkpoint(tmp_path, tiny_model_dir):
    run = tmp_path / "run"
    fake_checkpoint(run, 100, complete=False)  # a crashed legacy save with a higher step
    trainer = make_trainer(tiny_model_dir, run, save_total_limit=1)
    trainer.train()
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-6"]
    manifest = json.loads((run / "checkpoint-6" / checkpoints.MANIFEST).read_text())
    assert manifest["step"] == 6 and "optimizer.pt" in manifest["files"]


def test_rotation_orders_by_step_number_not_name_or_mtime(tmp_path):
    run = tmp_path / "run"
    fake_checkpoint(run, 8000, mtime=1_000)
    fake_checkpoint(run, 10000, mtime=2_000)
    fake_checkpoint(run, 9000, mtime=3_000)  # written last (a resumed run re-saved it)
    fake_checkpoint(run, 11000, complete=False)
    deleted = rotate_checkpoints(run, save_total_limit=1)
    assert sorted(p.name for p in deleted) == ["checkpoint-8000", "checkpoint-9000"]
    assert find_good_checkpoint(run) == str(run / "checkpoint-10000")
    assert (run / "checkpoint-11000").exists()  # rotation only deletes complete checkpoints


def test_rotation_keeps_the_best_checkpoint(tmp_path):
    run = tmp_path / "run"
    for step in (1000, 2000, 3000):
        fake_checkpoint(run, step)
    rotate_checkpoints(run, save_total_limit=1, best=str(run / "checkpoint-1000"))
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-1000", "checkpoint-3000"]


def test_incomplete_checkpoint_directories_are_ignored(tmp_path):
    run = tmp_path / "run"
    assert find_good_checkpoint(run) is None
    fake_checkpoint(run, 2)
    truncated = fake_checkpoint(run, 3)
    (truncated / "model.safetensors").write_bytes(b"x" * 10)  # shorter than the manifest says
    fake_checkpoint(run, 4, complete=False)  # no manifest, no trainer_state.json
    (run / ".partial-checkpoint-5" / "checkpoint-5").mkdir(parents=True)
    (run / "checkpoint-6").write_text("not a directory")
    assert not is_complete_checkpoint(truncated)
    assert find_good_checkpoint(run) == str(run / "checkpoint-2")

    legacy = fake_checkpoint(run, 7, complete=False)
    (legacy / "trainer_state.json").write_text("{}")  # plain Trainer writes this last
    assert find_good_checkpoint(run) == str(legacy)


def test_a_save_that_cannot_fit_fails_first_naming_the_directory_and_bytes(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(checkpoints, "free_bytes", lambda path: 1000)
    run = tmp_path / "run"
    with pytest.raises(CheckpointSpaceError) as info:
        make_trainer(tiny_model_dir, run).train()
    message = str(info.value)
    assert f"output.dir={run}" in message and "checkpoint-2" in message
    assert "but only 1,000 bytes" in message and "no checkpoint was saved yet" in message
    assert not any(run.iterdir())  # nothing half-written


def test_best_checkpoint_survives_rotation_and_loads_at_end(tmp_path, tiny_model_dir):
    run = tmp_path / "run"
    trainer = make_trainer(
        tiny_model_dir, run, save_total_limit=1, eval_strategy="steps", eval_steps=2,
        load_best_model_at_end=True, metric_for_best_model="loss",
    )
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and ".partial" not in best and is_complete_checkpoint(best)
    saved_state = (run / os.path.basename(best) / "trainer_state.json").read_text()
    assert ".partial" not in saved_state  # the staging path never leaks into resumed state


def test_disk_space_is_planned_for_the_kept_checkpoints_and_a_final_model_without_optimizer_state():
    """A run that saves no checkpoints needs only its final weights on disk. Counting AdamW's
    moments for it refused an 8B FSDP2 run: 74.8 GiB asked, 15 GiB of weights to write."""
    from types import SimpleNamespace

    from tuneforge.train.checkpoints import estimate_run_bytes

    layer = torch.nn.Linear(4, 3)  # 15 fp32 values: 60 bytes of weights, 120 of moments
    no_saves = SimpleNamespace(save_strategy="no", save_total_limit=None, save_only_model=False)
    assert estimate_run_bytes(layer, no_saves) == 60
    kept_three = SimpleNamespace(save_strategy="steps", save_total_limit=3, save_only_model=False)
    assert estimate_run_bytes(layer, kept_three) == 3 * (60 + 120) + 60
    weights_only = SimpleNamespace(save_strategy="steps", save_total_limit=None, save_only_model=True)
    assert estimate_run_bytes(layer, weights_only) == 2 * 60 + 60
