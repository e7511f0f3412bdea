"""tuneforge's `Trainer`: the Hugging Face one, with atomic checkpoints (`checkpoints.py`),
skipped non-finite steps (`guards.py`), rollback after a loss spike (`spike.py`), logging
of the losses a model adds itself, less host work a step (the FLOP count and the module
walks done once: a LoRA step is partly bound by the host), token counts read without waiting
for the GPU, and the gradient clip applied by torch's fused optimizers as they read the gradients.

MoE models add the router load-balancing loss to the language-modelling loss (PITFALLS 10:
when it is silently off, experts collapse). It is logged as `aux_loss` so a run shows it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from transformers import Trainer

from tuneforge.train.checkpoints import AtomicCheckpointMixin
from tuneforge.train.deferred import DeferredValue
from tuneforge.train.guards import ONE_PROCESS_OR_DDP, NonFiniteGuardMixin, fused_optimizer
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


class _ModuleWalksOnce:
    """`train()` and `zero_grad()` for one model object that walk lists taken once instead of the
    module tree. Installed as instance attributes (removed by `remove`), so every caller, the
    Trainer's included, gets them; the class methods still do the work when something changed."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.modules = list(model.modules())
        self.parameters = list(model.parameters())
        model.train = self.train  # type: ignore[method-assign]
        model.zero_grad = self.zero_grad  # type: ignore[method-assign]

    def train(self, mode: bool = True) -> torch.nn.Module:
        # Checking every flag is a list scan; setting them is a recursive walk. A submodule
        # switched on its own (a callback's `layer.eval()`) still gets switched back.
        if any(module.training != mode for module in self.modules):
            type(self.model).train(self.model, mode)
        return self.model

    def zero_grad(self, set_to_none: bool = True) -> None:
        if not set_to_none:
            type(self.model).zero_grad(self.model, set_to_none=False)
            return
        for parameter in self.parameters:
            if parameter.grad is not None:
                parameter.grad = None

    def remove(self) -> None:
        del self.model.train, self.model.zero_grad


class ModuleWalksOnceMixin:
    """The Trainer walks the whole module tree three times a step: `model.train()` sets every
    module's flag though none changed, `model.zero_grad()` and the gradient clip each list the
    parameters. An 8B LoRA model has about 3,000 modules: 13 ms of host time a step, during which
    the GPU, synchronised by the non-finite check, has no work (docs/benchmarks.md). With one
    process or DDP the parameters are fixed once the model is prepared, so the lists are taken at
    the first step of each `train()` call. Put it before `Trainer` in the bases."""

    _module_walks: _ModuleWalksOnce | None = None

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        if self._module_walks is None and self.accelerator.distributed_type in ONE_PROCESS_OR_DDP:  # type: ignore[attr-defined]
            self._module_walks = _ModuleWalksOnce(model)
        return super().training_step(model, inputs, num_items_in_batch)  # type: ignore[misc]

    def _clip_grad_norm(self, model: Any) -> Any:
        walks = self._module_walks
        if walks is None or walks.model is not model:
            return super()._clip_grad_norm(model)  # type: ignore[misc]
        return self.accelerator.clip_grad_norm_(walks.parameters, self.args.max_grad_norm)  # type: ignore[attr-defined]

    def train(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().train(*args, **kwargs)  # type: ignore[misc]
        finally:
            if self._module_walks is not None:
                self._module_walks.remove()
                self._module_walks = None


class TokensCountedAheadMixin:
    """The Trainer counts each micro-batch's tokens after its backward (`_track_num_input_tokens`)
    and reads the count on the host, which waits for the backward to end; the GPU then has no work
    until the host has launched the next kernels. Here the same count (all or non-padding tokens,
    summed over processes) is queued before the forward and copied to host memory as soon as it is
    computed, so reading it after the backward waits for that copy only. Put it before `Trainer`
    in the bases."""

    _tokens_ahead: DeferredValue | None = None

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        self._tokens_ahead = self._count_tokens(inputs)
        return super().training_step(model, inputs, num_items_in_batch)  # type: ignore[misc]

    def _track_num_input_tokens(self, inputs: dict[str, Any]) -> None:
        counted, self._tokens_ahead = self._tokens_ahead, None
        if counted is None:
            return super()._track_num_input_tokens(inputs)  # type: ignore[misc]
        self.state.num_input_tokens_seen += int(counted.get())  # type: ignore[attr-defined]

    def _count_tokens(self, inputs: dict[str, Any]) -> DeferredValue | None:
        """The micro-batch's count as the Trainer takes it; None where the Trainer's own count runs
        (it warns when it cannot count)."""
        args = self.args  # type: ignore[attr-defined]
        name = getattr(self.model, "main_input_name", "input_ids")  # type: ignore[attr-defined]
        if args.include_num_input_tokens_seen == "no" or not isinstance(inputs, Mapping) or name not in inputs:
            return None
        count: torch.Tensor | int
        if args.include_num_input_tokens_seen != "non_padding":
            count = inputs[name].numel()
        elif "attention_mask" in inputs:
            count = inputs["attention_mask"].sum()
        elif getattr(self.processing_class, "pad_token_id", None) is not None:  # type: ignore[attr-defined]
            count = (inputs[name] != self.processing_class.pad_token_id).sum()  # type: ignore[attr-defined]
        else:
            return None
        if args.world_size > 1:
            # A fill, not `torch.tensor(count, device=...)`: a copy from host memory waits for the GPU.
            local = count if isinstance(count, torch.Tensor) else torch.full((), count, dtype=torch.int64, device=args.device)
            count = self.accelerator.reduce(local.to(torch.int64), reduction="sum")  # type: ignore[attr-defined]
        return DeferredValue.of(count)


class ClipInFusedOptimizerMixin:
    """`clip_grad_norm_` reads every gradient for the norm, then reads and writes every one again to
    scale it: 2.9 ms of a full 1B step's 9.3 ms of clip and AdamW over 1.2 billion bf16 gradients
    (docs/benchmarks.md). Torch's fused optimizers divide each gradient by `optimizer.grad_scale`
    inside their own kernel, so here the clip takes the norm and hands its factor over; the
    gradients are scaled by the same factor as `clip_grad_norm_`'s, `max_norm / (norm + 1e-6)`
    capped at 1, in fp32 before the update, and left scaled in `.grad` as after a clip. Only for one
    process or DDP (whose gradients are whole and reduced when clipped) without fp16's gradient
    scaler, which owns `grad_scale`. Put it before `Trainer` in the bases."""

    def _clip_grad_norm(self, model: Any) -> Any:
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)  # type: ignore[attr-defined]
        accelerator = self.accelerator  # type: ignore[attr-defined]
        if not (fused_optimizer(optimizer) and accelerator.scaler is None and accelerator.distributed_type in ONE_PROCESS_OR_DDP):
            return super()._clip_grad_norm(model)  # type: ignore[misc]
        gradients = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(gradients)
        optimizer.grad_scale = torch.clamp((norm.float() + 1e-6) / self.args.max_grad_norm, min=1.0)  # type: ignore[attr-defined]
        return norm


class TuneforgeTrainer(NonFiniteGuardMixin, ClipInFusedOptimizerMixin, ModuleWalksOnceMixin, TokensCountedAheadMixin, FlopsPerTokenOnceMixin, LossSpikeGuardMixin, AtomicCheckpointMixin, Trainer):
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


__all__ = ["ClipInFusedOptimizerMixin", "FlopsPerTokenOnceMixin", "ModuleWalksOnceMixin", "TokensCountedAheadMixin", "TuneforgeTrainer"]
