"""Quantization-aware training (seed 003's "bit training") through torchao's QAT flow.

    prepare: linear layers become fake-quantized (weights int4/int8 per group, activations
             int8 per token), so training sees the rounding it will meet when served;
    convert: at the end, the same layers become real quantized ones.
"""

from __future__ import annotations

from typing import Any

import torch

from tuneforge.config.schema import QatSettings
from tuneforge.errors import MethodError


def _base_config(settings: QatSettings) -> Any:
    from torchao.quantization import (
        Int8DynamicActivationIntxWeightConfig,
        IntxWeightOnlyConfig,
    )
    from torchao.quantization.granularity import PerGroup

    weight_dtype = torch.int4 if settings.weights == "int4" else torch.int8
    if settings.activations == "int8":
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=weight_dtype, weight_granularity=PerGroup(settings.group_size))
    return IntxWeightOnlyConfig(weight_dtype=weight_dtype, granularity=PerGroup(settings.group_size))


def _is_quantizable(model: torch.nn.Module, settings: QatSettings) -> Any:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None

    def keep(module: torch.nn.Module, name: str) -> bool:
        # The output head stays in full precision (as in torchao's and ExecuTorch's recipes);
        # layers whose width is not a multiple of the group size cannot be grouped.
        return (
            isinstance(module, torch.nn.Linear)
            and module is not head
            and module.in_features % settings.group_size == 0
        )

    return keep


def _apply(model: torch.nn.Module, settings: QatSettings, step: str) -> torch.nn.Module:
    try:
        from torchao.quantization import quantize_
        from torchao.quantization.qat import QATConfig
    except ImportError:
        raise MethodError(
            "quantization-aware training needs torchao", where="method.qat", hint="pip install torchao"
        ) from None
    quantize_(model, QATConfig(_base_config(settings), step=step), filter_fn=_is_quantizable(model, settings))
    return model


def prepare_qat(model: torch.nn.Module, settings: QatSettings) -> torch.nn.Module:
    """Swap linear layers for fake-quantized ones (training still updates full-precision weights)."""
    model = _apply(model, settings, "prepare")
    if not any(type(m).__name__ == "FakeQuantizedLinear" for m in model.modules()):
        raise MethodError(
            f"no linear layer can be fake-quantized with group_size={settings.group_size}",
            where="method.qat.group_size",
            hint="choose a group size that divides the layers' input width",
        )
    return model


def convert_qat(model: torch.nn.Module, settings: QatSettings) -> torch.nn.Module:
    """Replace the fake-quantized layers by real quantized ones (in memory)."""
    return _apply(model, settings, "convert")


def save_quantized(model_dir: str, out_dir: str, settings: QatSettings) -> None:
    """Write the QAT-trained weights of `model_dir` as a quantized checkpoint in `out_dir`.

    Loading through transformers' torchao integration applies the same quantization as QAT's
    convert step and saves torchao tensors as safetensors, so `out_dir` reloads with plain
    `AutoModelForCausalLM.from_pretrained`.
    """
    from transformers import AutoModelForCausalLM, TorchAoConfig

    quantized = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=TorchAoConfig(_base_config(settings)))
    quantized.save_pretrained(out_dir)


__all__ = ["convert_qat", "prepare_qat", "save_quantized"]
