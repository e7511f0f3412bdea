"""Guards against non-finite training: a NaN or inf loss or gradient never reaches the weights.

    class TuneforgeTrainer(NonFiniteGuardMixin, Trainer): ...
    trainer = TuneforgeTrainer(..., max_nonfinite_steps=3)

Before each optimizer step the guard checks the micro-batch losses of the step and the
gradients. When one is NaN or inf it drops the step's gradients, so the optimizer leaves the
weights and its own state (moments, step count) as they were, and training goes on with the
next batch. After `max_nonfinite_steps` skipped steps the next bad one stops the run with a
`NonFiniteError` naming the step, the batch and the last checkpoint written (which holds
good weights: a skipped step changes nothing). Logged `loss` and `grad_norm` values that are
not finite are left out of the logs, so `metrics.jsonl` never holds NaN.

The learning-rate schedule still advances on a skipped step: the step is spent, like a
step whose batch had no trained token.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from transformers import (
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from tuneforge.errors import TuneforgeError
from tuneforge.train.checkpoints import find_good_checkpoint


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


def _gradients(model: Any, optimizer: Any) -> list[torch.Tensor]:
    params = (
        [p for group in optimizer.param_groups for p in group["params"]]
        if optimizer is not None
        else list(model.parameters())
    )
    return [p.grad for p in params if p.grad is not None]


def gradients_are_finite(gradients: list[torch.Tensor]) -> bool:
    """Whether every gradient entry is finite (one host sync for all tensors)."""
    if not gradients:
        return True
    # A norm is NaN/inf iff some entry is; foreach computes them in few kernels.
    norms = torch._foreach_norm([g.detach() for g in gradients]) if len(gradients) > 1 else [gradients[0].detach().norm()]
    return bool(torch.isfinite(torch.stack([n.float().to(norms[0].device) for n in norms])).all())


def _any_rank(flag: bool, device: torch.device) -> bool:
    """Every rank must take the same decision, or the replicas' weights drift apart."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item() > 0)


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
    """

    def __init__(self, max_nonfinite_steps: int = 0, tokenizer: Any = None) -> None:
        if max_nonfinite_steps < 0:
            raise ValueError(f"max_nonfinite_steps must be >= 0, got {max_nonfinite_steps}")
        self.max_nonfinite_steps = max_nonfinite_steps
        self.tokenizer = tokenizer
        # fp16's gradient scaler already skips steps with inf gradients and lowers its scale:
        # those are its normal signal, not a fault.
        self.check_gradients = True
        self.skipped_steps: list[int] = []
        self._batches: list[torch.Tensor | None] = []
        self._bad_loss_batch: torch.Tensor | None = None
        self._loss_is_bad = False
        self._gradient_norm: torch.Tensor | None = None

    def saw_gradient_norm(self, norm: torch.Tensor) -> None:
        """The step's total gradient norm, taken by the clip: finite iff every gradient is, so the
        check needs no pass of its own over the gradients."""
        self._gradient_norm = norm

    def observe(self, loss: torch.Tensor, inputs: dict[str, Any]) -> bool:
        """Record one micro-batch's loss and input ids (called after its backward).

        Returns:
            Whether the loss is finite.
        """
        # A collator's BatchEncoding is a Mapping, not a dict.
        input_ids = inputs.get("input_ids") if isinstance(inputs, Mapping) else None
        self._batches.append(input_ids)
        # A host sync per micro-batch; the Trainer's own NaN filter on the loss syncs here anyway.
        finite = bool(torch.isfinite(loss.detach()).all())
        if not finite and not self._loss_is_bad:
            self._loss_is_bad = True
            self._bad_loss_batch = input_ids
        return finite

    def _reset(self) -> None:
        self._batches = []
        self._bad_loss_batch = None
        self._loss_is_bad = False
        self._gradient_norm = None

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._reset()

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        model, optimizer = kwargs.get("model"), kwargs.get("optimizer")
        if not self.check_gradients:
            grads_ok = True
        elif self._gradient_norm is not None:
            grads_ok = bool(torch.isfinite(self._gradient_norm))
        else:
            grads_ok = gradients_are_finite(_gradients(model, optimizer))
        # The process's own device, not a gradient's: DeepSpeed ZeRO keeps gradients in its own
        # buffers (no `.grad`), and NCCL has no CPU tensors.
        if not _any_rank(self._loss_is_bad or not grads_ok, args.device):
            self._reset()
            return
        step = state.global_step + 1
        what = "loss" if self._loss_is_bad else "gradient norm"
        if len(self.skipped_steps) >= self.max_nonfinite_steps:
            raise self._error(step, what, args)
        # No gradient, no update: torch optimizers skip parameters whose grad is None, so the
        # weights, moments and per-parameter step counts stay as they were.
        for group in (optimizer.param_groups if optimizer is not None else []):
            for param in group["params"]:
                param.grad = None
        if optimizer is None and model is not None:
            model.zero_grad(set_to_none=True)
        self.skipped_steps.append(step)
        print(
            f"[tuneforge] step {step}: non-finite {what}; optimizer step skipped "
            f"({len(self.skipped_steps)} of {self.max_nonfinite_steps} allowed); "
            f"{describe_batch(self._offending_batch(), self.tokenizer)}",
            flush=True,
        )
        self._reset()

    def _offending_batch(self) -> torch.Tensor | None:
        if self._bad_loss_batch is not None:
            return self._bad_loss_batch
        return self._batches[0] if self._batches else None

    def _error(self, step: int, what: str, args: TrainingArguments) -> NonFiniteError:
        checkpoint = find_good_checkpoint(args.output_dir)
        kept = (
            f"the last checkpoint, {checkpoint}, holds the weights from before it"
            if checkpoint is not None
            else "no checkpoint was written before it"
        )
        skipped = ", ".join(map(str, self.skipped_steps)) or "none"
        return NonFiniteError(
            f"non-finite {what} (NaN or inf) in {describe_batch(self._offending_batch(), self.tokenizer)}; "
            f"{len(self.skipped_steps)} bad step(s) were already skipped (steps: {skipped}), "
            f"{self.max_nonfinite_steps} allowed; {kept}",
            where=f"step {step}",
            hint="lower train.learning_rate, set train.max_grad_norm, check the batch's rows, "
            "or allow more skipped steps with max_nonfinite_steps",
        )


class NonFiniteGuardMixin:
    """Adds a `NonFiniteGuard` to a `transformers.Trainer` subclass.

    Put it before `Trainer` in the bases; it takes one extra keyword, `max_nonfinite_steps`.
    """

    def __init__(self, *args: Any, max_nonfinite_steps: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.nonfinite_guard = NonFiniteGuard(max_nonfinite_steps, tokenizer=getattr(self, "processing_class", None))
        self.nonfinite_guard.check_gradients = getattr(self.accelerator, "scaler", None) is None  # type: ignore[attr-defined]
        self.add_callback(self.nonfinite_guard)  # type: ignore[attr-defined]

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)  # type: ignore[misc]
        if not self.nonfinite_guard.observe(loss, inputs) and not self.args.logging_nan_inf_filter:  # type: ignore[attr-defined]
            # Unfiltered, one NaN would make the running loss NaN for good (NaN - NaN is
            # NaN when the Trainer resets it); the skipped step adds nothing instead.
            return torch.zeros_like(loss)
        return loss

    def _clip_grad_norm(self, model: Any) -> Any:
        norm = super()._clip_grad_norm(model)  # type: ignore[misc]
        if isinstance(norm, torch.Tensor):
            self.nonfinite_guard.saw_gradient_norm(norm)
        return norm

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        # With `logging_nan_inf_filter` off, a NaN loss would reach metrics.jsonl; a skipped
        # step's grad_norm is NaN whatever the filter says.
        for key in ("loss", "grad_norm"):
            value = logs.get(key)
            if isinstance(value, (int, float)) and not math.isfinite(value):
                del logs[key]
        if self.nonfinite_guard.skipped_steps and "loss" in logs:
            logs["skipped_steps"] = len(self.nonfinite_guard.skipped_steps)
        super().log(logs, *args, **kwargs)  # type: ignore[misc]


__all__ = [
    "NonFiniteError",
    "NonFiniteGuard",
    "NonFiniteGuardMixin",
    "describe_batch",
    "gradients_are_finite",
]
