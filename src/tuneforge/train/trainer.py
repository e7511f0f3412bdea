"""tuneforge's `Trainer`: the Hugging Face one, with atomic checkpoints (`checkpoints.py`),
skipped non-finite steps (`guards.py`), rollback after a loss spike (`spike.py`), and logging
of the losses a model adds itself.

MoE models add the router load-balancing loss to the language-modelling loss (PITFALLS 10:
when it is silently off, experts collapse). It is logged as `aux_loss` so a run shows it.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer

from tuneforge.train.checkpoints import AtomicCheckpointMixin
from tuneforge.train.guards import NonFiniteGuardMixin
from tuneforge.train.spike import LossSpikeGuardMixin


class FlopsPerTokenOnceMixin:
    """The Trainer adds each batch's floating-point operations to `total_flos` at every step,
    counting the model's parameters anew (`num_parameters` walks every module): on an 8B LoRA
    step about 60 ms of host time, over which the GPU ran out of work (docs/benchmarks.md).
    The count is fixed while training, so the Trainer's own figure for one token is taken once
    and scaled by the batch's tokens. Put it before `Trainer` in the bases."""

    _flops_per_token: float | None = None

    def floating_point_ops(self, inputs: dict[str, Any]) -> float:
        tokens = inputs.get(getattr(self.model, "main_input_name", "input_ids"))  # type: ignore[attr-defined]
        if not isinstance(tokens, torch.Tensor):
            return super().floating_point_ops(inputs)  # type: ignore[misc]
        if self._flops_per_token is None:
            one_token = {getattr(self.model, "main_input_name", "input_ids"): tokens.new_zeros(1)}  # type: ignore[attr-defined]
            self._flops_per_token = super().floating_point_ops(one_token)  # type: ignore[misc]
        return self._flops_per_token * tokens.numel()


class TuneforgeTrainer(FlopsPerTokenOnceMixin, NonFiniteGuardMixin, LossSpikeGuardMixin, AtomicCheckpointMixin, Trainer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Summed on the device and read only when logging: no host sync per step.
        self._aux_sum: torch.Tensor | None = None
        self._aux_count = 0

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        loss, outputs = super().compute_loss(
            model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        aux = outputs.get("aux_loss") if isinstance(outputs, dict) else getattr(outputs, "aux_loss", None)
        if aux is not None and model.training:
            aux = aux.detach().float()
            self._aux_sum = aux if self._aux_sum is None else self._aux_sum + aux
            self._aux_count += 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self._aux_sum is not None and "loss" in logs:
            logs["aux_loss"] = round((self._aux_sum / self._aux_count).item(), 6)
            self._aux_sum, self._aux_count = None, 0
        super().log(logs, *args, **kwargs)


__all__ = ["FlopsPerTokenOnceMixin", "TuneforgeTrainer"]
