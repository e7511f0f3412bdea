"""One entry point for every method: a loaded model in, a model ready to train out.

    model, counts = prepare_model(config.method, model)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tuneforge.config.schema import FreezeMethod, FullMethod, LoraMethod
from tuneforge.errors import MethodError
from tuneforge.methods.freeze import apply_freeze
from tuneforge.methods.lora import apply_lora
from tuneforge.methods.qat import prepare_qat
from tuneforge.models.parameters import full_numel


@dataclass(frozen=True)
class ParameterCounts:
    trainable: int
    total: int

    def describe(self) -> str:
        share = 100.0 * self.trainable / max(self.total, 1)
        return f"trainable parameters: {self.trainable:,} of {self.total:,} ({share:.4f}%)"


def count_parameters(model: torch.nn.Module) -> ParameterCounts:
    trainable = total = 0
    for parameter in model.parameters():
        total += full_numel(parameter)
        if parameter.requires_grad:
            trainable += full_numel(parameter)
    return ParameterCounts(trainable, total)


def prepare_model(
    method: FullMethod | FreezeMethod | LoraMethod,
    model: torch.nn.Module,
    *,
    new_token_ids: list[int] | None = None,
    gradient_checkpointing: bool = False,
    fused_lora: bool = False,
) -> tuple[torch.nn.Module, ParameterCounts]:
    """Apply the method and check that something will train.

    Args:
        method: the `method` config section.
        model: the loaded model.
        new_token_ids: ids of added tokens whose embedding rows must train.
        gradient_checkpointing: whether the Trainer will checkpoint (k-bit preparation needs it).
        fused_lora: LoRA adapters use the fused forward (`speed.fused_lora`, methods/fused_lora.py).

    Raises:
        MethodError: the method leaves no trainable parameter.
    """
    if isinstance(method, FullMethod):
        model.requires_grad_(True)
    elif isinstance(method, FreezeMethod):
        model = apply_freeze(method, model)
        if new_token_ids:
            model.get_input_embeddings().weight.requires_grad_(True)
    else:
        model = apply_lora(
            method, model, new_token_ids=new_token_ids, gradient_checkpointing=gradient_checkpointing, fused=fused_lora
        )
    if not isinstance(method, LoraMethod) and method.qat is not None:
        model = prepare_qat(model, method.qat)
    counts = count_parameters(model)
    if counts.trainable == 0:
        raise MethodError(
            "no parameter would train",
            where=f"method.name={method.name}",
            hint="check the trainable/frozen patterns",
        )
    return model, counts


__all__ = ["ParameterCounts", "count_parameters", "prepare_model"]
