"""LoRA adapters through peft."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model

from tuneforge.config.schema import LoraMethod
from tuneforge.errors import MethodError


def build_lora_config(method: LoraMethod) -> LoraConfig:
    return LoraConfig(
        r=method.r,
        lora_alpha=method.lora_alpha,
        lora_dropout=method.lora_dropout,
        target_modules=method.target_modules,
        bias=method.bias,
        modules_to_save=method.modules_to_save or None,
        task_type="CAUSAL_LM",
    )


def apply_lora(method: LoraMethod, model: torch.nn.Module) -> torch.nn.Module:
    try:
        return get_peft_model(model, build_lora_config(method))
    except ValueError as exc:
        linear = sorted(
            {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        )
        raise MethodError(
            str(exc).splitlines()[0],
            where="method.target_modules",
            hint=f"this model's linear layers are named: {', '.join(linear)}; or use all-linear",
        ) from None


__all__ = ["apply_lora", "build_lora_config"]
