"""The non-finite guard: a NaN loss or gradient skips the step (weights unchanged), too many stop the run."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from tuneforge.errors import TuneforgeError
from tuneforge.train.callbacks import MetricsLogger
from tuneforge.train.checkpoints import find_good_checkpoint
from tuneforge.train.guards import (
    NonFiniteError,
    NonFiniteGuard,
    NonFiniteGuardMixin,
    describe_batch,
    gradient_norm,
)
from tuneforge.train.trainer import ClipInFusedOptimizerMixin

POISON = 7  # a batch holding this token id gets a NaN loss


class TinyLM(nn.Module):
    """Enough of a causal LM for the Trainer: ids in, {'loss': ...} out; NaN loss on POISON."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(16, 8)
        self.head = nn.Linear(8, 16)
        self.poisoned_forwards = 0

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.head(self.embed(input_ids))
        loss = nn.functional.cross_entropy(logits.view(-1, 16), labels.view(-1))
        if self.training and bool((input_ids == POISON).any()):
            self.poisoned_forwards += 1
            loss = loss * float("nan")  # NaN loss, NaN gradients
        return {"loss": loss, "logits": logits}


class GuardedTrainer(NonFiniteGuardMixin, Trainer):
    """What `class TuneforgeTrainer(NonFiniteGuardMixin, Trainer)` becomes."""


def rows(poisoned_at: set[int], count: int = 8) -> list[dict[str, torch.Tensor]]:
    out = []
    for index in range(count):
        ids = torch.tensor([1, 2, 3, POISON if index in poisoned_at else 4])
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


class WeightRecorder(TrainerCallback):
    """Per step: whether the model saw a poisoned batch, and whether the weights changed."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, bool, bool]] = []
        self._before: list[torch.Tensor] = []
        self._poisoned = 0

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self._before = [p.detach().clone() for p in model.parameters()]
        self._poisoned = model.poisoned_forwards

    def on_step_end(self, args, state, control, model=None, **kwargs):
        changed = any(not torch.equal(a, p) for a, p in zip(self._before, model.parameters()))
        self.steps.append((state.global_step, model.poisoned_forwards > self._poisoned, changed))


def make_trainer(tmp_path, data, max_nonfinite_steps, callbacks=(), **arguments) -> GuardedTrainer:
    settings = dict(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=1, max_steps=len(data),
        learning_rate=0.1, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
        seed=0, disable_tqdm=True,
    )
    settings.update(arguments)
    (tmp_path / "run").mkdir(parents=True, exist_ok=True)
    return GuardedTrainer(
        model=TinyLM(), args=TrainingArguments(**settings), train_dataset=data,
        callbacks=[MetricsLogger(tmp_path / "run" / "metrics.jsonl"), *callbacks],
        max_nonfinite_steps=max_nonfinite_steps,
    )


def metrics(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("nan_filter", [True, False])
def test_a_nan_loss_skips_its_step_and_training_goes_on(tmp_path, nan_filter):
    recorder = WeightRecorder()
    trainer = make_trainer(tmp_path, rows({2, 5}), 2, [recorder], logging_nan_inf_filter=nan_filter)
    trainer.train()

    poisoned = [step for step, bad, _ in recorder.steps if bad]
    assert len(poisoned) == 2 and trainer.nonfinite_guard.skipped_steps == poisoned
    assert trainer.state.global_step == 8  # went on after both bad steps
    for step, bad, changed in recorder.steps:
        assert changed != bad, f"step {step}: poisoned={bad}, weights changed={changed}"
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    # The optimizer's state did not see the bad steps either: 6 real updates.
    assert {int(s["step"]) for s in trainer.optimizer.state.values()} == {6}
    logged = metrics(tmp_path)
    losses = [m["loss"] for m in logged if "loss" in m]
    assert len(losses) >= 6 and all(math.isfinite(v) for v in losses)
    assert all(math.isfinite(m["grad_norm"]) for m in logged if "grad_norm" in m)
    assert [m.get("skipped_steps", 0) for m in logged if "loss" in m][-1] == 2


@pytest.mark.parametrize("logging_steps", [1, 100])
def test_more_bad_steps_than_allowed_stop_the_run_naming_step_batch_and_checkpoint(tmp_path, logging_steps):
    recorder = WeightRecorder()
    trainer = make_trainer(tmp_path, rows({1, 3, 6}), 1, [recorder], save_strategy="steps", save_steps=1,
                           logging_steps=logging_steps)
    with pytest.raises(NonFiniteError) as caught:
        trainer.train()
    assert isinstance(caught.value, TuneforgeError)
    poisoned = [step for step, bad, _ in recorder.steps if bad]
    # The first bad step was skipped; the second raised once its verdict was read (at its log, or
    # before the next step's update), the fused optimizer having skipped its update on the device.
    assert len(poisoned) == 2 and trainer.nonfinite_guard.skipped_steps == poisoned[:1]
    assert not any(changed for step, _, changed in recorder.steps if step in poisoned)
    failed = poisoned[1]
    # Read at its log: before its checkpoint; read at the next step: after it (good weights too).
    saved_last = failed - 1 if logging_steps == 1 else failed
    message = str(caught.value)
    assert message.startswith(f"step {failed}: non-finite loss (NaN or inf) in batch of 1 x 4 tokens")
    assert f"first row starts [1, 2, 3, {POISON}]" in message
    assert f"steps: {poisoned[0]}" in message and "1 allowed" in message
    kept = Path(find_good_checkpoint(tmp_path / "run") or "")
    assert kept.name == f"checkpoint-{saved_last}"
    assert str(kept) in message
    # The kept checkpoint's weights are finite and equal the live ones (the failed step changed nothing).
    from safetensors.torch import load_file

    saved = load_file(str(kept / "model.safetensors"))
    for name, param in trainer.model.named_parameters():
        assert torch.equal(saved[name], param.detach())
    if logging_steps == 1:
        assert all(math.isfinite(m["loss"]) for m in metrics(tmp_path) if "loss" in m)


def test_zero_allowed_stops_at_the_first_bad_step(tmp_path):
    trainer = make_trainer(tmp_path, rows(set(range(8))), 0)
    with pytest.raises(NonFiniteError, match="^step 1: .*no checkpoint was written before it"):
        trainer.train()


class PoisonGradient(TrainerCallback):
    """Makes one gradient entry NaN in the backward of one step (the loss stays finite), as an
    overflow in a backward kernel would: before the clip takes the norm the guard reads."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step
        self._hook = None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.at_step:
            self._hook = next(model.parameters()).register_hook(lambda grad: grad.index_fill(0, torch.tensor([0]), float("nan")))

    def on_step_end(self, args, state, control, **kwargs):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


def test_a_nan_gradient_with_a_finite_loss_is_skipped(tmp_path):
    recorder = WeightRecorder()
    trainer = make_trainer(tmp_path, rows(set()), 1, [PoisonGradient(at_step=3), recorder])
    trainer.train()
    assert trainer.nonfinite_guard.skipped_steps == [3]
    assert [changed for _, _, changed in recorder.steps] == [True, True, False, True, True, True, True, True]


@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0])
def test_the_guard_reads_the_clips_norm_instead_of_a_pass_of_its_own(tmp_path, monkeypatch, max_grad_norm):
    """The clip has just taken the norm of every gradient; a second pass costs about 1 ms of a full
    1B step on an H200. Without a clip (`max_grad_norm: 0`) the guard still takes its own."""
    guards = sys.modules[NonFiniteGuard.__module__]
    own_passes = []
    monkeypatch.setattr(guards, "gradient_norm", lambda grads: own_passes.append(1) or gradient_norm(grads))
    trainer = make_trainer(tmp_path, rows(set()), 1, [PoisonGradient(at_step=3)], max_grad_norm=max_grad_norm)
    trainer.train()
    assert trainer.nonfinite_guard.skipped_steps == [3]
    assert len(own_passes) == (0 if max_grad_norm else 8)


class FusedClipGuardedTrainer(NonFiniteGuardMixin, ClipInFusedOptimizerMixin, Trainer):
    """The order of `TuneforgeTrainer`'s bases."""


def test_a_nan_gradient_clipped_inside_the_fused_optimizer_is_skipped(tmp_path):
    recorder = WeightRecorder()
    settings = dict(output_dir=str(tmp_path / "run"), per_device_train_batch_size=1, max_steps=8, learning_rate=0.1,
                    save_strategy="no", report_to="none", use_cpu=True, seed=0, disable_tqdm=True, max_grad_norm=0.01)
    trainer = FusedClipGuardedTrainer(model=TinyLM(), args=TrainingArguments(**settings), train_dataset=rows(set()),
                                      callbacks=[PoisonGradient(at_step=3), recorder], max_nonfinite_steps=1)
    trainer.train()
    assert trainer.optimizer.optimizer.grad_scale.item() > 1  # the clip went through the optimizer
    assert trainer.nonfinite_guard.skipped_steps == [3]
    assert [changed for _, _, changed in recorder.steps] == [True, True, False, True, True, True, True, True]
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_the_guard_alone_as_a_callback_checks_gradients(tmp_path):
    """Without the mixin (no loss or batch), NaN gradients are still caught."""
    data = rows({4})
    settings = dict(output_dir=str(tmp_path / "run"), per_device_train_batch_size=1, max_steps=8,
                    logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True)
    guard = NonFiniteGuard(max_nonfinite_steps=0)
    trainer = Trainer(model=TinyLM(), args=TrainingArguments(**settings), train_dataset=data, callbacks=[guard])
    with pytest.raises(NonFiniteError, match=r"^step \d+: non-finite gradient norm \(NaN or inf\) in batch \(no input_ids\)"):
        trainer.train()


def test_gradient_accumulation_skips_the_whole_step(tmp_path):
    recorder = WeightRecorder()
    trainer = make_trainer(tmp_path, rows({3}), 1, [recorder], gradient_accumulation_steps=2, max_steps=4)
    trainer.train()
    assert trainer.nonfinite_guard.skipped_steps == [2]  # micro-batches 2 and 3 form step 2
    assert [changed for _, _, changed in recorder.steps] == [True, False, True, True]


def test_describe_batch_and_the_gradient_norm_finds_non_finite_entries(tokenizer):
    ids = torch.tensor(tokenizer("### Question:\nafter 3")["input_ids"]).unsqueeze(0)
    text = describe_batch(ids, tokenizer, shown=4)
    first = ", ".join(map(str, ids[0, :4].tolist()))
    assert text.startswith(f"batch of 1 x {ids.shape[1]} tokens, first row starts [{first}, ...] ('<s>###")
    assert describe_batch(None) == "batch (no input_ids)"
    def finite(gradients):
        return bool(torch.isfinite(gradient_norm(gradients)))

    assert finite([torch.ones(3), torch.zeros(2, 2)])
    assert not finite([torch.ones(3), torch.tensor([0.0, float("inf")])])
    assert not finite([torch.tensor([float("nan")])])
    assert finite([])
    with pytest.raises(ValueError):
        NonFiniteGuard(-1)


def test_ranks_agree_on_the_process_device_when_no_gradient_is_visible(monkeypatch):
    """Under DeepSpeed ZeRO the parameters carry no `.grad` (the engine keeps the gradients);
    the ranks' vote then went to a CPU tensor, which NCCL refuses ("No backend type associated
    with device type cpu") and stopped the 8B ZeRO-3 run at its first step."""
    from types import SimpleNamespace

    voted_on = []
    guards = sys.modules[NonFiniteGuard.__module__]
    monkeypatch.setattr(guards, "_any_rank_on_device", lambda bad: voted_on.append(bad.device) or torch.zeros(()))
    # The process's device ("meta" here: allocates nothing, and is neither a gradient's nor the CPU).
    args = SimpleNamespace(device=torch.device("meta"), output_dir="unused")
    model = nn.Linear(2, 2)  # no backward run: every .grad is None, as under ZeRO
    guard = NonFiniteGuard()
    guard.on_pre_optimizer_step(args, SimpleNamespace(global_step=0), None, model=model,
                                optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    assert voted_on == [torch.device("meta")]


def test_a_collators_batch_encoding_is_read_for_the_batch_it_names():
    """Collators hand the Trainer a `BatchEncoding` (a Mapping, not a dict): the guard read "no
    input_ids" from it and its error could not show the offending batch."""
    from transformers import BatchEncoding

    from types import SimpleNamespace

    guard = NonFiniteGuard()
    ids = torch.tensor([[POISON, 1, 2]])
    assert not guard.observe(torch.tensor(float("nan")), BatchEncoding({"input_ids": ids}))
    model = nn.Linear(2, 2)
    with pytest.raises(NonFiniteError, match=rf"^step 1: non-finite loss .* first row starts \[{POISON}, 1, 2\]"):
        guard.on_pre_optimizer_step(SimpleNamespace(device=torch.device("cpu"), output_dir="none"), SimpleNamespace(global_step=0),
                                    None, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))


class StepEndRecorder(TrainerCallback):
    """Per step: the skips the guard had counted by the step's end, and the Trainer's NaN filter then."""

    def __init__(self, trainer_box: list) -> None:
        self.trainer_box = trainer_box
        self.skipped_at_step_end: list[list[int]] = []
        self.filter_while_training: set[bool] = set()

    def on_step_end(self, args, state, control, **kwargs):
        self.skipped_at_step_end.append(list(self.trainer_box[0].nonfinite_guard.skipped_steps))
        self.filter_while_training.add(args.logging_nan_inf_filter)


def test_the_fused_optimizer_skips_a_bad_step_itself_and_the_verdict_is_read_a_step_later(tmp_path):
    """No host read of the verdict inside the step: the fused AdamW gets it as `found_inf` and
    skips the update on the device; the guard counts the skip when it reads the verdict, at the
    next step (or a log, or the end). The Trainer's own NaN filter, a host read of every
    micro-batch loss, is off while training and back afterwards."""
    box: list = []
    steps = StepEndRecorder(box)
    weights = WeightRecorder()
    trainer = make_trainer(tmp_path, rows({2}), 1, [weights, steps], logging_steps=100, data_seed=0,
                           max_steps=6)
    box.append(trainer)
    losses: list[float] = []
    trainer.model.register_forward_hook(lambda module, args, output: losses.append(float(output["loss"].detach())))
    trainer.train()
    bad = next(step for step, poisoned, _ in weights.steps if poisoned)
    assert trainer.nonfinite_guard.skipped_steps == [bad]
    # Counted at the next step's optimizer step, not at the bad step's own end.
    assert steps.skipped_at_step_end[bad - 1] == [] and steps.skipped_at_step_end[bad] == [bad]
    assert [changed for _, _, changed in weights.steps] == [step != bad for step in range(1, 7)]
    assert {int(s["step"]) for s in trainer.optimizer.state.values()} == {5}  # the skip left the step count
    assert steps.filter_while_training == {False} and trainer.args.logging_nan_inf_filter is True
    assert sum(not math.isfinite(loss) for loss in losses) == 1


def test_the_logged_loss_averages_the_finite_micro_batches(tmp_path):
    trainer = make_trainer(tmp_path, rows({1}, count=4), 1, logging_steps=2, max_steps=4)
    losses: list[float] = []
    trainer.model.register_forward_hook(lambda module, args, output: losses.append(float(output["loss"].detach())))
    trainer.train()
    logged = [m["loss"] for m in metrics(tmp_path) if "loss" in m]
    pairs = [losses[0:2], losses[2:4]]
    expected = [sum(v for v in pair if math.isfinite(v)) / sum(math.isfinite(v) for v in pair) for pair in pairs]
    assert sum(not math.isfinite(v) for v in losses) == 1
    assert logged == pytest.approx(expected, rel=1e-3)
