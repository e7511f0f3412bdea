"""4-bit NF4 storage for fused mixture-of-experts weights, which bitsandbytes leaves in 16 bits.

transformers 5 stores each MoE layer's experts as 3-D parameters (`gate_up_proj`: experts x 2F x H,
`down_proj`: experts x H x F) instead of one `nn.Linear` per expert, and bitsandbytes quantizes
`nn.Linear` layers only: a "4-bit" Mixtral-8x7B keeps 90 GB of its 94 in bf16. Here each such
parameter is stored as bitsandbytes NF4 (double-quantized absmax, as QLoRA stores linear
layers) behind a `torch.nn.utils.parametrize` parametrization, so `experts.gate_up_proj` still
reads as the bf16 tensor the model's own forward indexes. It is dequantized once per call of
the experts module (the parametrization cache is on during the call), so the 16-bit copy of one
layer's experts exists only while that layer computes, and while its backward pass runs: the
expert matmuls keep their weight for the input gradient. That is why a run with quantized
experts recomputes its layers (the planner counts one layer's dequantized experts).

    quantize_fused_experts(model)        # after loading; returns how many parameters it stored
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn.utils import parametrize

from tuneforge.models.dequantize import dequantize_4bit


def fused_expert_parameters(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str]]:
    """(module, name) of every fused expert weight: a parameter of three or more dimensions
    (one matrix per expert), not a LoRA adapter's."""
    found = []
    for module_name, module in model.named_modules():
        if "lora_" in module_name:
            continue
        for name, parameter in module.named_parameters(recurse=False):
            if parameter.dim() >= 3:
                found.append((module, name))
    return found


class Nf4Weight(torch.nn.Module):
    """Parametrization: the stored tensor is bitsandbytes' packed NF4 data; reading the
    parameter dequantizes it to the dtype it had."""

    def __init__(self) -> None:
        super().__init__()
        self.quant_state: Any = None

    def right_inverse(self, weight: torch.Tensor) -> tuple[torch.Tensor]:
        import bitsandbytes.functional as bnb

        packed, self.quant_state = bnb.quantize_4bit(
            weight.detach().contiguous(), blocksize=64, compress_statistics=True, quant_type="nf4"
        )
        return (packed,)  # a sequence: parametrize lets the stored dtype differ only then

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        if self.quant_state.absmax.device != packed.device:  # the module moved (model.to(device))
            self.quant_state.to(packed.device)
        return dequantize_4bit(packed, self.quant_state)


def _cache_on(module: torch.nn.Module, args: Any) -> None:
    module._nf4_cache = parametrize.cached()
    module._nf4_cache.__enter__()


def _cache_off(module: torch.nn.Module, args: Any, output: Any) -> None:
    module._nf4_cache.__exit__(None, None, None)


def quantize_fused_experts(model: torch.nn.Module, device: torch.device | None = None) -> int:
    """Store every fused expert weight of `model` as NF4 (frozen: quantized weights do not
    train). Each experts module dequantizes once per call. With `device`, each weight is moved
    there and quantized there one at a time (a model loaded into CPU memory: only one 16-bit
    weight is on the GPU at once). Returns how many parameters."""
    targets = fused_expert_parameters(model)
    modules: dict[int, torch.nn.Module] = {}
    for module, name in targets:
        weight = getattr(module, name).detach()
        if device is not None and weight.device != device:
            # Replacing the parameter drops the CPU copy once the NF4 one is stored.
            module._parameters[name] = torch.nn.Parameter(weight.to(device), requires_grad=False)
        getattr(module, name).requires_grad_(False)
        parametrize.register_parametrization(module, name, Nf4Weight(), unsafe=True)
        modules[id(module)] = module
    for module in modules.values():
        module.register_forward_pre_hook(_cache_on)
        module.register_forward_hook(_cache_off, always_call=True)
    return len(targets)


def is_nf4_parametrized(module: torch.nn.Module, name: str) -> bool:
    return parametrize.is_parametrized(module, name) and any(
        isinstance(p, Nf4Weight) for p in module.parametrizations[name]
    )


__all__ = ["Nf4Weight", "fused_expert_parameters", "is_nf4_parametrized", "quantize_fused_experts"]
