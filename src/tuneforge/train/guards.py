"""Guards against non-finite training: a NaN or inf loss or gradient never reaches the weights.

    class TuneforgeTrainer(NonFiniteGuardMixin, Trainer): ...
    trainer = TuneforgeTrainer(..., max_nonfinite_steps=3)

Before each optimizer step the guard checks the micro-batch losses of the step and the
gradients. When one is NaN or inf the optimizer leaves the weights and its own state (moments,
step count) as they were, and training goes on with the next batch. After `max_nonfinite_steps`
skipped steps the next bad one stops the run with a `NonFiniteError` naming the step, the batch
and the last checkpoint written (which holds good weights: a skipped step changes nothing).
Non-finite micro-batch losses are left out of the logged loss, and logged `grad_norm` values
that are not finite are left out of the logs, so `metrics.jsonl` never holds NaN.

The check costs the step no wait for the GPU. The verdict is computed on the device; torch's
fused optimizers (Adam, AdamW, SGD: the Trainer's default) take it as `found_inf`, the input
through which AMP's gradient scaler makes them skip a step, so the host reads it later (at the
next step, a log, or the end of training) from a copy made as soon as the GPU computed it. A read
inside the step, like the Trainer's own NaN filter on the loss, would leave the GPU without work
until the host had launched the next kernels. With other optimizers, or a sharding engine, the
guard reads the verdict before the step and drops the gradients, as before.

The learning-rate schedule still advances on a skipped step: the step is spent, like a
step whose batch had no trained token.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import DistributedType
from transformers import (
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from tuneforge.errors import TuneforgeError
from tuneforge.train.checkpoints import find_good_checkpoint
from tuneforge.train.deferred import DeferredValue


class NonFiniteError(TuneforgeError):
    """Training produced NaN or inf losses or gradients more often than allowed."""


def describe_batch(input_ids: torch.Tensor | None, tokenizer: Any = None, shown: int = 12) -> str:
    """A short, human-readable identity of a batch: its shape and the start of its first row.

    Example:
        `batch of 4 x 31 tokens, first row starts [1, 35, 99, ...] ('### Question:\\nafter')`
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim == 0 or input_ids.numel() == 0:
        return "batch (no input_ids)"
    rows = input_ids if input_ids.ndim > 1 else input_ids.unsqueeze(0)
    first = rows[0, :shown].tolist()
    text = f"batch of {rows.shape[0]} x {rows.shape[1]} tokens, first row starts {first}"
    if rows.shape[1] > shown:
        text = text[:-1] + ", ...]"
    decode = getattr(tokenizer, "decode", None)
    if callable(decode):
        try:
            decoded = decode(first)
        except Exception:  # a processor without a plain decode: the ids alone still identify the batch
            decoded = None
        if isinstance(decoded, str):
            text += f" ({decoded[:60]!r})"
    return text


# One process or DDP: the parameters stay the same objects once prepared, and their gradients are
# whole (reduced across ranks by the time the clip runs). Sharding engines (FSDP, DeepSpeed) hold neither.
ONE_PROCESS_OR_DDP = (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU)


def _gradients(model: Any, optimizer: Any) -> list[torch.Tensor]:
    params = (
        [p for group in optimizer.param_groups for p in group["params"]]
        if optimizer is not None
        else list(model.parameters())
    )
    return [p.grad for p in params if p.grad is not None]


def gradient_norm(gradients: list[torch.Tensor]) -> torch.Tensor:
    """The total norm of `gradients`, on their device: NaN or inf iff some entry is."""
    if not gradients:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm([g.detach() for g in gradients])


def fused_optimizer(optimizer: Any) -> bool:
    """Whether `optimizer` reads AMP's inputs inside its own kernel: it divides each gradient by its
    `grad_scale` tensor and skips the step when its `found_inf` tensor is 1, with no host read.
    torch's fused Adam, AdamW and SGD, which AMP's gradient scaler drives that way."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False) and getattr(optimizer, "defaults", {}).get("fused"))


def _any_rank(flag: bool, device: torch.device) -> bool:
    """Every rank must take the same decision, or the replicas' weights drift apart."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item() > 0)


def _any_rank_on_device(bad: torch.Tensor) -> torch.Tensor:
    """`_any_rank` for a verdict on the device, queued without a host sync."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    return bad


@dataclass
class _Verdict:
    """One step's check: `bad` is 1.0 when its loss or gradients were not finite."""

    step: int
    bad: DeferredValue
    losses_finite: list[torch.Tensor]  # one flag a micro-batch, on the device
    batches: list[torch.Tensor | None]


class NonFiniteGuard(TrainerCallback):
    """Skips optimizer steps whose loss or gradients are not finite; stops after too many.

    Used alone as a callback it checks gradients only; `NonFiniteGuardMixin` also feeds it
    every micro-batch loss and batch (`observe`), so a NaN loss with finite gradients is
    caught too and the error names the batch.

    Args:
        max_nonfinite_steps: How many bad steps are skipped over the run; the next one raises.
            0 stops at the first.
        tokenizer: Used to show the start of the offending batch as text.

    Attributes:
        skipped_steps: The (1-based) steps skipped so far, as `metrics.jsonl` numbers them.
        skip_on_device: Whether a fused optimizer may skip bad steps itself (`found_inf`), the
            verdict read later; set by `NonFiniteGuardMixin` for one process or DDP.
    """

    def __init__(self, max_nonfinite_steps: int = 0, tokenizer: Any = None) -> None:
        if max_nonfinite_steps < 0:
            raise ValueError(f"max_nonfinite_steps must be >= 0, got {max_nonfinite_steps}")
        self.max_nonfinite_steps = max_nonfinite_steps
        self.tokenizer = tokenizer
        # fp16's gradient scaler already skips steps with inf gradients and lowers its scale:
        # those are its normal signal, not a fault.
        self.check_gradients = True
        self.skip_on_device = False
        self.skipped_steps: list[int] = []
        self._batches: list[torch.Tensor | None] = []
        self._losses_finite: list[torch.Tensor] = []
        self._gradient_norm: torch.Tensor | None = None
        self._pending: _Verdict | None = None  # a step the optimizer judged on the device, not yet read
        self._optimizer: Any = None  # the one given `found_inf`

    def saw_gradient_norm(self, norm: torch.Tensor) -> None:
        """The step's total gradient norm, taken by the clip: finite iff every gradient is, so the
        check needs no pass of its own over the gradients."""
        self._gradient_norm = norm

    def observe(self, loss: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
        """Record one micro-batch's loss and input ids (called after its backward).

        Returns:
            Whether the loss is finite, as a boolean tensor on the loss's device (no host sync).
        """
        # A collator's BatchEncoding is a Mapping, not a dict.
        self._batches.append(inputs.get("input_ids") if isinstance(inputs, Mapping) else None)
        finite = torch.isfinite(loss.detach()).all()
        self._losses_finite.append(finite)
        return finite

    def _reset(self) -> None:
        self._batches = []
        self._losses_finite = []
        self._gradient_norm = None

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._reset()

    def _verdict(self, model: Any, optimizer: Any, device: torch.device) -> torch.Tensor:
        """1.0 when the step's losses or gradients are not finite, agreed by every rank; on the device."""
        bad = torch.zeros((), device=device)
        if self._losses_finite:
            bad = (~torch.stack([flag.to(device) for flag in self._losses_finite]).all()).float()
        if self.check_gradients:
            norm = self._gradient_norm if self._gradient_norm is not None else gradient_norm(_gradients(model, optimizer))
            if hasattr(norm, "full_tensor"):  # FSDP2's norm is a DTensor; its vote below is a plain all-reduce
                norm = norm.full_tensor()
            bad = torch.maximum(bad, (~torch.isfinite(norm.to(device))).float())
        return _any_rank_on_device(bad)

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.settle(args)  # the step before: read before this one's update, so an error comes first
        model, optimizer = kwargs.get("model"), kwargs.get("optimizer")
        inner = getattr(optimizer, "optimizer", optimizer)
        step = state.global_step + 1
        if self.skip_on_device and self.check_gradients and fused_optimizer(inner):
            # The gradients' device: the verdict joins the optimizer's own tensors there.
            gradients = _gradients(model, inner)
            bad = self._verdict(model, inner, gradients[0].device if gradients else args.device)
            inner.found_inf = bad
            self._optimizer = inner
            self._pending = _Verdict(step, DeferredValue.of(bad), self._losses_finite, self._batches)
            self._reset()
            return
        # The process's own device, not a gradient's: DeepSpeed ZeRO keeps gradients in its own
        # buffers (no `.grad`), and NCCL has no CPU tensors.
        verdict = _Verdict(step, DeferredValue.of(self._verdict(model, optimizer, args.device)), self._losses_finite, self._batches)
        self._reset()
        if self._judge(verdict, args):
            # No gradient, no update: torch optimizers skip parameters whose grad is None, so the
            # weights, moments and per-parameter step counts stay as they were.
            for group in (optimizer.param_groups if optimizer is not None else []):
                for param in group["params"]:
                    param.grad = None
            if optimizer is None and model is not None:
                model.zero_grad(set_to_none=True)

    def settle(self, args: TrainingArguments | None = None) -> None:
        """Read the verdict of a step the optimizer judged on the device: count it, say it, or
        raise `NonFiniteError` when it was one bad step too many."""
        pending, self._pending = self._pending, None
        if pending is not None:
            self._judge(pending, args)

    def _judge(self, verdict: _Verdict, args: TrainingArguments | None) -> bool:
        """Whether the step was bad; a bad one is counted and reported, or raises past the allowance."""
        if not bool(verdict.bad.get() > 0):
            return False
        losses_finite = [bool(flag) for flag in verdict.losses_finite]
        what = "gradient norm" if all(losses_finite) else "loss"
        # The micro-batch whose loss was bad, else the step's first.
        batch = next((b for b, ok in zip(verdict.batches, losses_finite) if not ok), verdict.batches[0] if verdict.batches else None)
        if len(self.skipped_steps) >= self.max_nonfinite_steps:
            raise self._error(verdict.step, what, batch, args)
        self.skipped_steps.append(verdict.step)
        print(
            f"[tuneforge] step {verdict.step}: non-finite {what}; optimizer step skipped "
            f"({len(self.skipped_steps)} of {self.max_nonfinite_steps} allowed); "
            f"{describe_batch(batch, self.tokenizer)}",
            flush=True,
        )
        return True

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self._optimizer is not None:  # the optimizer may step again, unguarded (another train())
            del self._optimizer.found_inf
            self._optimizer = None
        self.settle(args)

    def _error(self, step: int, what: str, batch: torch.Tensor | None, args: TrainingArguments | None) -> NonFiniteError:
        checkpoint = find_good_checkpoint(args.output_dir) if args is not None else None
        kept = (
            f"the last checkpoint, {checkpoint}, holds the weights from before it"
            if checkpoint is not None
            else "no checkpoint was written before it"
        )
        skipped = ", ".join(map(str, self.skipped_steps)) or "none"
        return NonFiniteError(
            f"non-finite {what} (NaN or inf) in {describe_batch(batch, self.tokenizer)}; "
            f"{len(self.skipped_steps)} bad step(s) were already skipped (steps: {skipped}), "
            f"{self.max_nonfinite_steps} allowed; {kept}",
            where=f"step {step}",
            hint="lower train.learning_rate, set train.max_grad_norm, check the batch's rows, "
            "or allow more skipped steps with max_nonfinite_steps",
        )


class NonFiniteGuardMixin:
    """Adds a `NonFiniteGuard` to a `transformers.Trainer` subclass.

    Put it before `Trainer` in the bases; it takes one extra keyword, `max_nonfinite_steps`.

    The Trainer's own filter of non-finite losses (`logging_nan_inf_filter`) reads every
    micro-batch loss on the host; while training it is off, and the guard leaves those losses
    out of the logged average on the device instead: the Trainer sums a 0 for each, and the
    logged loss is the mean of the finite ones. Evaluation keeps the setting.
    """

    def __init__(self, *args: Any, max_nonfinite_steps: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.nonfinite_guard = NonFiniteGuard(max_nonfinite_steps, tokenizer=getattr(self, "processing_class", None))
        accelerator = self.accelerator  # type: ignore[attr-defined]
        self.nonfinite_guard.check_gradients = getattr(accelerator, "scaler", None) is None
        self.nonfinite_guard.skip_on_device = accelerator.distributed_type in ONE_PROCESS_OR_DDP
        self.add_callback(self.nonfinite_guard)  # type: ignore[attr-defined]
        self._nan_filter = self.args.logging_nan_inf_filter  # type: ignore[attr-defined]
        self._losses_logged = 0  # micro-batch losses summed since the last logged loss
        self._finite_losses: torch.Tensor | None = None  # how many of them were finite, on the device

    def train(self, *args: Any, **kwargs: Any) -> Any:
        self._nan_filter = self.args.logging_nan_inf_filter  # type: ignore[attr-defined]
        self.args.logging_nan_inf_filter = False  # type: ignore[attr-defined]
        try:
            return super().train(*args, **kwargs)  # type: ignore[misc]
        finally:
            self.args.logging_nan_inf_filter = self._nan_filter  # type: ignore[attr-defined]

    def evaluate(self, *args: Any, **kwargs: Any) -> Any:
        training_setting = self.args.logging_nan_inf_filter  # type: ignore[attr-defined]
        self.args.logging_nan_inf_filter = self._nan_filter  # type: ignore[attr-defined]
        try:
            return super().evaluate(*args, **kwargs)  # type: ignore[misc]
        finally:
            self.args.logging_nan_inf_filter = training_setting  # type: ignore[attr-defined]

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)  # type: ignore[misc]
        finite = self.nonfinite_guard.observe(loss, inputs)
        self._losses_logged += 1
        self._finite_losses = finite.long() if self._finite_losses is None else self._finite_losses + finite.long()
        # One NaN would make the running loss NaN for good (NaN - NaN is NaN when the Trainer
        # resets it); a bad micro-batch adds 0, and `log` averages over the finite ones.
        return torch.where(finite, loss, torch.zeros_like(loss))

    def _clip_grad_norm(self, model: Any) -> Any:
        norm = super()._clip_grad_norm(model)  # type: ignore[misc]
        if isinstance(norm, torch.Tensor):
            self.nonfinite_guard.saw_gradient_norm(norm)
        return norm

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        self.nonfinite_guard.settle(self.args)  # type: ignore[attr-defined]
        if "loss" in logs and self._finite_losses is not None:
            finite = int(self._finite_losses.item())
            if 0 < finite < self._losses_logged:
                logs["loss"] = round(logs["loss"] * self._losses_logged / finite, 4)
            elif finite == 0:
                del logs["loss"]
            self._losses_logged, self._finite_losses = 0, None
        # A skipped step's grad_norm is NaN.
        for key in ("loss", "grad_norm"):
            value = logs.get(key)
            if isinstance(value, (int, float)) and not math.isfinite(value):
                del logs[key]
        if self.nonfinite_guard.skipped_steps and "loss" in logs:
            logs["skipped_steps"] = len(self.nonfinite_guard.skipped_steps)
        super().log(logs, *args, **kwargs)  # type: ignore[misc]


__all__ = [
    "ONE_PROCESS_OR_DDP",
    "NonFiniteError",
    "NonFiniteGuard",
    "NonFiniteGuardMixin",
    "describe_batch",
    "fused_optimizer",
    "gradient_norm",
    ]
