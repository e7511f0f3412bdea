"""The loss-spike guard: a spiking step rolls the run back to its newest checkpoint (weights and
optimizer state bit-equal, a LoRA adapter too), the data moves on, too many spikes stop the run,
a normal run never rolls back, every rank of a two-process run rolls back at the same step, and
FSDP's sharded weights are restored (on CPU, through tests/support/fsdp_cpu as in test_fsdp_cpu.py)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import TrainerCallback, TrainingArguments

from tests.conftest import successor_rows, write_jsonl
from tests.train.test_fsdp_cpu import SUPPORT, needs_fsdp_on_cpu
from tuneforge.config.loading import load_config
from tuneforge.errors import ConfigError, TuneforgeError
from tuneforge.train import train
from tuneforge.train.callbacks import MetricsLogger
from tuneforge.train.checkpoints import find_good_checkpoint
from tuneforge.train.spike import LossSpikeError, SpikeDetector
from tuneforge.train.trainer import TuneforgeTrainer

REPO = Path(__file__).resolve().parents[2]
VOCAB = 32
SPIKE = VOCAB - 1  # a batch holding this token id gets its loss multiplied by SPIKE_SCALE
SPIKE_SCALE = 20.0
ROWS = 20


class SpikyLM(nn.Module):
    """Enough of a causal LM for the Trainer; records the last token of every training batch,
    and multiplies the (finite) loss of a batch holding SPIKE."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, 8)
        self.head = nn.Linear(8, VOCAB)
        self.seen: list[int] = []

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.head(self.embed(input_ids))
        loss = nn.functional.cross_entropy(logits.view(-1, VOCAB), labels.view(-1))
        if self.training:
            self.seen.extend(input_ids[:, -1].tolist())
            if bool((input_ids == SPIKE).any()):
                loss = loss * SPIKE_SCALE
        return {"loss": loss, "logits": logits}


def rows(spikes_at_step: set[int], count: int = ROWS) -> list[dict[str, torch.Tensor]]:
    """One row per step (batch 1, sequential order): row i is trained at step i + 1."""
    out = []
    for index in range(count):
        ids = torch.tensor([1, 2, 3, SPIKE if index + 1 in spikes_at_step else 4 + index % (SPIKE - 4)])
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def make_trainer(tmp_path: Path, data, callbacks=(), model: nn.Module | None = None, **arguments) -> TuneforgeTrainer:
    guard = {key: arguments.pop(key) for key in ("spike_factor", "spike_window", "max_rollbacks") if key in arguments}
    settings = {
        "output_dir": str(tmp_path / "run"), "per_device_train_batch_size": 1, "max_steps": len(data),
        "learning_rate": 1e-2, "logging_steps": 1, "save_strategy": "steps", "save_steps": 4, "report_to": "none",
        "use_cpu": True, "seed": 0, "disable_tqdm": True, "train_sampling_strategy": "sequential",
    }
    settings.update(arguments)
    (tmp_path / "run").mkdir(parents=True, exist_ok=True)
    return TuneforgeTrainer(
        model=model if model is not None else SpikyLM(), args=TrainingArguments(**settings), train_dataset=data,
        callbacks=[MetricsLogger(tmp_path / "run" / "metrics.jsonl"), *callbacks],
        **{"spike_factor": 3.0, "spike_window": 4, **guard},
    )


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def optimizer_tensors(state_dict: dict) -> dict[tuple[int, str], torch.Tensor]:
    return {(index, name): value for index, state in state_dict["state"].items() for name, value in state.items()}


class AfterStep(TrainerCallback):
    """Runs `check(step, model, optimizer, scheduler)` at the end of chosen steps; added after the
    guard, so it sees the state the guard left."""

    def __init__(self, steps: set[int], check) -> None:
        self.steps, self.check = steps, check

    def on_step_end(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        if state.global_step in self.steps:
            self.check(state.global_step, model, optimizer, lr_scheduler)


def test_a_spike_rolls_back_to_the_newest_checkpoint_and_the_data_moves_on(tmp_path, capsys):
    spike_step, checkpoint_step = 11, 8  # checkpoints every 4 steps
    trainer = make_trainer(tmp_path, rows({spike_step}))
    checkpoint = tmp_path / "run" / f"checkpoint-{checkpoint_step}"
    seen_at: dict[int, dict] = {}

    def check(step, model, optimizer, scheduler):
        seen_at[step] = {
            "weights": {name: p.detach().clone() for name, p in model.named_parameters()},
            "optimizer": {key: value.clone() for key, value in optimizer_tensors(optimizer.state_dict()).items()},
            "lr": optimizer.param_groups[0]["lr"],
            "schedule_step": scheduler.last_epoch,
            # Read now: the files are what was restored, whatever later saves do.
            "saved": load_file(str(checkpoint / "model.safetensors")) if step == spike_step else None,
            "saved_optimizer": optimizer_tensors(torch.load(checkpoint / "optimizer.pt", weights_only=True))
            if step == spike_step else None,
        }

    trainer.add_callback(AfterStep({spike_step - 1, spike_step}, check))
    trainer.train()

    assert trainer.spike_guard.rollbacks == [spike_step]
    after = seen_at[spike_step]
    # The weights right after the rollback are the checkpoint's, bit for bit; the steps since
    # it had changed them.
    for name, value in after["saved"].items():
        assert torch.equal(after["weights"][name], value), name
        assert not torch.equal(seen_at[spike_step - 1]["weights"][name], value), name
    # So is the optimizer state (moments and step counts): checkpoint-8 had taken 8 steps.
    assert after["optimizer"].keys() == after["saved_optimizer"].keys()
    for key, value in after["saved_optimizer"].items():
        assert torch.equal(after["optimizer"][key], value), key
    assert {int(value) for (_, name), value in after["optimizer"].items() if name == "step"} == {checkpoint_step}
    # The schedule is not rewound: linear decay from 1e-2 over 20 steps, at step 11 (not 8).
    assert after["schedule_step"] == spike_step
    assert after["lr"] == pytest.approx(1e-2 * (ROWS - spike_step) / ROWS)
    # The data moved on: every row trained once, in order; steps 9-11 are not replayed.
    assert trainer.model.seen == [SPIKE if i + 1 == spike_step else 4 + i for i in range(ROWS)]
    assert trainer.state.global_step == ROWS
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())

    logged = [m for m in metrics(tmp_path / "run") if "loss" in m]
    assert math.isfinite(logged[-1]["loss"]) and logged[-1]["step"] == ROWS
    assert [m.get("rollbacks", 0) for m in logged] == [0] * (spike_step - 1) + [1] * (ROWS - spike_step + 1)
    out = capsys.readouterr().out
    assert f"step {spike_step}: loss spike: loss " in out and "x the median " in out and "of the last 4 steps" in out
    assert f"rolled back to {checkpoint}" in out and "the batches of steps 9-11 are skipped" in out
    assert f"learning-rate schedule stays at step {spike_step}" in out and "rollback 1 of 3 allowed" in out


def test_a_spike_restores_a_lora_adapter_and_its_optimizer_state(tmp_path):
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    model = get_peft_model(SpikyLM(), LoraConfig(r=4, lora_alpha=8, target_modules=["head"]))
    base = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    trainer = make_trainer(tmp_path, rows({11}), model=model)
    checkpoint = tmp_path / "run" / "checkpoint-8"
    seen_at: dict[int, dict] = {}

    def check(step, model, optimizer, scheduler):
        seen_at[step] = {
            "adapter": {k: v.clone() for k, v in get_peft_model_state_dict(model).items()},
            "optimizer": {key: value.clone() for key, value in optimizer_tensors(optimizer.state_dict()).items()},
        }
        if step == 11:
            seen_at[step]["saved"] = load_file(str(checkpoint / "adapter_model.safetensors"))
            seen_at[step]["saved_optimizer"] = optimizer_tensors(torch.load(checkpoint / "optimizer.pt", weights_only=True))

    trainer.add_callback(AfterStep({10, 11, 12}, check))
    trainer.train()

    assert trainer.spike_guard.rollbacks == [11]
    after = seen_at[11]
    assert after["saved"].keys() == after["adapter"].keys() and len(after["saved"]) == 2
    for name, value in after["saved"].items():
        assert torch.equal(after["adapter"][name], value), name
        assert not torch.equal(seen_at[10]["adapter"][name], value), name
        # The optimizer still holds the live adapter tensors: the next step trains them.
        assert not torch.equal(seen_at[12]["adapter"][name], value), name
    assert after["optimizer"].keys() == after["saved_optimizer"].keys()
    for key, value in after["saved_optimizer"].items():
        assert torch.equal(after["optimizer"][key], value), key
    for name, p in trainer.model.named_parameters():
        if name in base:
            assert torch.equal(p.detach(), base[name]), name  # the frozen base was never touched


def test_more_spikes_than_max_rollbacks_stop_the_run_naming_the_setting(tmp_path):
    # Rollback at 7 (to checkpoint-6). The window starts empty again and refills over steps 8-11,
    # so the spike at 10 is not judged (the median shrugs it off); the one at 13 is one too many.
    trainer = make_trainer(tmp_path, rows({7, 10, 13}), save_steps=2, max_rollbacks=1)
    with pytest.raises(LossSpikeError) as caught:
        trainer.train()
    assert isinstance(caught.value, TuneforgeError)
    assert trainer.spike_guard.rollbacks == [7]
    assert trainer.state.global_step == 13
    message = str(caught.value)
    assert message.startswith("step 13: loss spike: loss ")
    assert "already rolled back 1 time(s) (at steps 7), and guards.max_rollbacks is 1" in message
    assert f"the newest checkpoint, {tmp_path / 'run' / 'checkpoint-12'}, holds weights from before this spike" in message
    assert "hint: " in message and "guards.max_rollbacks" in message.split("hint: ")[1]


def test_max_rollbacks_0_stops_at_the_first_spike(tmp_path):
    trainer = make_trainer(tmp_path, rows({9}), max_rollbacks=0)
    with pytest.raises(LossSpikeError, match=r"^step 9: .*no rollback was allowed, and guards.max_rollbacks is 0"):
        trainer.train()


def test_a_spike_before_any_checkpoint_is_reported_and_training_goes_on(tmp_path, capsys):
    trainer = make_trainer(tmp_path, rows({7}), save_strategy="no")
    trainer.train()
    assert trainer.spike_guard.rollbacks == [] and trainer.state.global_step == ROWS
    out = capsys.readouterr().out
    assert "step 7: loss spike: loss " in out
    assert "no checkpoint to roll back to yet, so training goes on with the weights as they are" in out


def test_the_window_must_fill_before_anything_is_judged():
    detector = SpikeDetector(factor=3.0, window=3)
    for loss in (9.0, 4.0):  # a fast fall at the start: nothing to compare with yet
        assert not detector.is_spike(loss)
        detector.add(loss)
    assert detector.median is None and not detector.is_spike(1000.0)
    detector.add(2.0)
    assert detector.median == 4.0
    assert not detector.is_spike(12.0) and detector.is_spike(12.01)
    for loss in (1.5, 1.2, 1.0):  # still falling: never above the median of what came before
        assert not detector.is_spike(loss)
        detector.add(loss)
    assert detector.median == 1.2 and detector.is_spike(3.7)
    detector.reset()
    assert detector.median is None
    zeros = SpikeDetector(factor=3.0, window=3)
    for _ in range(3):
        zeros.add(0.0)
    assert not zeros.is_spike(0.5)  # a zero median gives no scale
    with pytest.raises(ValueError):
        SpikeDetector(factor=1.0, window=3)


def recipe_config(tmp_path: Path, model_dir: Path, **guards) -> dict:
    data = write_jsonl(tmp_path / "train.jsonl", successor_rows(160))
    return {
        "model": {"path": str(model_dir)},
        "data": {"datasets": [{"path": str(data), "prompt_fields": ["question"], "response_field": "answer"}],
                 "max_length": 32},
        "train": {"learning_rate": 1e-2, "per_device_train_batch_size": 4, "max_steps": 40, "logging_steps": 1,
                  "save_strategy": "steps", "save_steps": 5, "use_cpu": True},
        "guards": guards,
        "output": {"dir": str(tmp_path / "run")},
    }


def test_a_normal_run_whose_loss_falls_fast_never_rolls_back(tmp_path, tiny_model_dir):
    # The shortest window and a real run from its first step, where the loss falls fastest; each
    # step's loss is the sum of two micro-batches'.
    settings = recipe_config(tmp_path, tiny_model_dir, spike_factor=3.0, spike_window=3)
    settings["train"].update(per_device_train_batch_size=2, gradient_accumulation_steps=2, save_steps=10)
    result = train(settings)
    losses = [m["loss"] for m in metrics(result.run_dir) if "loss" in m]
    assert len(losses) == 40 and losses[0] > 2 * min(losses)  # it did fall fast
    assert not any("rollbacks" in m for m in metrics(result.run_dir))
    assert result.rollbacks == 0
    assert json.loads((result.run_dir / "summary.json").read_text())["rollbacks"] == 0


class BlowUpLearningRate(TrainerCallback):
    """One optimizer step with a learning rate 1000x too high: the next step's loss spikes."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step
        self._rates: list[float] = []

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if state.global_step + 1 == self.at_step:
            self._rates = [group["lr"] for group in optimizer.param_groups]
            for group in optimizer.param_groups:
                group["lr"] *= 1000

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self._rates:
            for group, rate in zip(optimizer.param_groups, self._rates):
                group["lr"] = rate
            self._rates = []


class TrainedWeightsAt(TrainerCallback):
    """The weights when step `step` begins, and the newest checkpoint's weights file then."""

    def __init__(self, step: int, run_dir: Path) -> None:
        self.step, self.run_dir = step, run_dir

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.step:
            self.checkpoint = Path(find_good_checkpoint(self.run_dir))
            self.weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
            self.saved = load_file(str(self.checkpoint / "model.safetensors"))


def test_a_real_spike_in_a_run_rolls_back_the_weights_and_is_in_the_summary(tmp_path, tiny_model_dir):
    settings = recipe_config(tmp_path, tiny_model_dir, spike_factor=3.0, spike_window=5)
    spiked = TrainedWeightsAt(step=18, run_dir=tmp_path / "run")  # the step after the rollback
    result = train(settings, callbacks=[BlowUpLearningRate(at_step=16), spiked])

    records = metrics(result.run_dir)
    losses = {m["step"]: m["loss"] for m in records if "loss" in m}
    assert losses[17] > 3 * losses[15]  # the blown-up update made step 17 spike
    assert result.rollbacks == 1 and [m.get("rollbacks", 0) for m in records if m.get("step") == 17] == [1]
    assert json.loads((result.run_dir / "summary.json").read_text())["rollbacks"] == 1
    assert spiked.checkpoint.name == "checkpoint-15"
    assert spiked.saved.keys() <= spiked.weights.keys() and len(spiked.saved) > 0
    for name, value in spiked.saved.items():
        assert torch.equal(spiked.weights[name], value), name
    assert math.isfinite(losses[40]) and losses[40] < 1.5 * min(losses[k] for k in range(10, 16))


def test_guard_settings_are_validated():
    base = {"model": {"path": "m"}, "data": {"datasets": [{"path": "d.jsonl"}]}}
    defaults = load_config(base).guards
    assert (defaults.spike_factor, defaults.spike_window, defaults.max_rollbacks) == (None, 100, 3)
    good = load_config(base, ["guards.spike_factor=3", "guards.spike_window=3", "guards.max_rollbacks=0"]).guards
    assert (good.spike_factor, good.spike_window, good.max_rollbacks) == (3.0, 3, 0)
    for override, field in [
        ("guards.spike_factor=1", "spike_factor"), ("guards.spike_factor=0.5", "spike_factor"),
        ("guards.spike_factor=abc", "spike_factor"), ("guards.spike_window=2", "spike_window"),
        ("guards.max_rollbacks=-1", "max_rollbacks"), ("guards.spike_windw=10", "spike_windw"),
    ]:
        with pytest.raises(ConfigError, match=field):
            load_config(base, [override])
    preference = {"model": {"path": "m"}, "data": {"datasets": [{"path": "d.jsonl", "format": "preference"}]},
                  "method": {"name": "dpo"}}
    load_config(preference)
    with pytest.raises(ConfigError, match="guards.spike_factor judges a supervised loss.*method 'dpo'"):
        load_config(preference, ["guards.spike_factor=3"])


def test_checkpoints_without_optimizer_state_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"^guards.spike_factor: .*train.save_only_model"):
        make_trainer(tmp_path, rows(set()), save_only_model=True)


DDP_SPIKE_STEP = 11


def _ddp_worker(out_dir: str) -> None:
    """One rank of the two-process test (run by torchrun): only rank 1's batch at DDP_SPIKE_STEP spikes."""
    rank = int(os.environ["RANK"])
    # Batch 1 per rank, sequential: step k trains rows 2k-2 (rank 0) and 2k-1 (rank 1).
    data = rows(set(), count=2 * ROWS)
    ids = data[2 * DDP_SPIKE_STEP - 1]["input_ids"]
    ids[-1] = SPIKE
    data[2 * DDP_SPIKE_STEP - 1]["labels"] = ids.clone()
    trainer = make_trainer(Path(out_dir), data, max_steps=ROWS, ddp_backend="gloo")
    restored: dict[str, bool] = {}

    def check(step, model, optimizer, scheduler):
        saved = load_file(str(Path(out_dir) / "run" / "checkpoint-8" / "model.safetensors"))
        restored["equal"] = all(torch.equal(p.detach(), saved[name]) for name, p in model.named_parameters())

    trainer.add_callback(AfterStep({DDP_SPIKE_STEP}, check))
    trainer.train()
    weights = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    result = {"rollbacks": trainer.spike_guard.rollbacks, "saw_spike": SPIKE in trainer.model.seen,
              "restored": restored.get("equal"), "weights": weights.tolist()}
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))


def run_two_ranks(*arguments: str, first_on_path: tuple[Path, ...] = ()) -> None:
    """Run this module's `__main__` in two gloo workers started by torchrun."""
    finished = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "tests.train.test_spike", *arguments],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=os.pathsep.join(map(str, [*first_on_path, REPO / "src", REPO]))),
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]


def test_every_rank_rolls_back_at_the_same_step_when_one_rank_spikes(tmp_path):
    run_two_ranks("ddp", str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["saw_spike"] for r in ranks] == [False, True]  # only rank 1's batch spiked
    assert [r["rollbacks"] for r in ranks] == [[DDP_SPIKE_STEP], [DDP_SPIKE_STEP]]
    assert [r["restored"] for r in ranks] == [True, True]
    assert ranks[0]["weights"] == ranks[1]["weights"]  # the replicas did not drift apart


class GatherWeights(TrainerCallback):
    """FSDP: the full weights, gathered from the shards on rank 0, when checkpoint `saved_at` is
    written and when the step after `rolled_back_at` begins (after the guard has acted)."""

    def __init__(self, out: Path, saved_at: int, rolled_back_at: int) -> None:
        self.out, self.saved_at, self.rolled_back_at = out, saved_at, rolled_back_at

    def on_save(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.saved_at:
            self._gather(model, "saved")

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.rolled_back_at:
            self._gather(model, "after-rollback")

    def _gather(self, model, name: str) -> None:
        # Imported here: only FSDP workers get this far, and needs_fsdp_on_cpu checks it exists.
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        # A collective: every rank takes part, rank 0 receives the full tensors.
        weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if torch.distributed.get_rank() == 0:
            save_file({key: value.contiguous() for key, value in weights.items()}, str(self.out / f"{name}.safetensors"))


def _fsdp_worker(config: str, out: str) -> None:
    train(config, callbacks=[BlowUpLearningRate(at_step=8), GatherWeights(Path(out), saved_at=7, rolled_back_at=9)])


@needs_fsdp_on_cpu
def test_under_fsdp_a_spike_restores_the_sharded_weights(tmp_path, tiny_model_dir):
    settings = recipe_config(tmp_path, tiny_model_dir, spike_factor=3.0, spike_window=4)
    settings["train"].update(max_steps=14, save_steps=7, report_to="none")
    settings["distributed"] = {"strategy": "fsdp"}
    config = tmp_path / "fsdp.yaml"
    config.write_text(yaml.safe_dump(settings), encoding="utf-8")
    run_two_ranks("fsdp", str(config), str(tmp_path), first_on_path=(SUPPORT / "fsdp_cpu",))

    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["rollbacks"] == 1
    assert [m.get("rollbacks", 0) for m in metrics(tmp_path / "run") if m.get("step") == 9 and "loss" in m] == [1]
    saved = load_file(str(tmp_path / "saved.safetensors"))
    restored = load_file(str(tmp_path / "after-rollback.safetensors"))
    assert saved.keys() == restored.keys() and len(saved) > 0
    for name, value in saved.items():
        assert torch.equal(restored[name], value), name


if __name__ == "__main__":
    from tuneforge.cli.main import exit_process

    {"ddp": _ddp_worker, "fsdp": _fsdp_worker}[sys.argv[1]](*sys.argv[2:])
    exit_process(0)  # as `tuneforge train` workers end: no interpreter teardown of the process group
