"""A LoRA forward that adds the adapter's product to the base output in one matmul.

peft's LoRA linear computes `result + lora_B(lora_A(x.to(fp32))) * scaling`: with a bf16 base and
fp32 adapters (peft's default) every adapted linear copies its input to fp32, autocast copies it
back to bf16 and keeps that copy for the backward pass (q, k and v each keep their own), and the
scale and the add are two more passes over the output. On an 8B model those copies were 30-60% of
a LoRA step's GPU time (docs/benchmarks.md). Here the same sum is one autograd function:

    x_a = x @ A.T                       (tokens x r)
    out = addmm(result, x_a, B.T, alpha=scaling)   (the add and the scale in the matmul)

in the base output's dtype, with the adapters' weights cast (r rows, small) instead of the
activations, and the input saved as it is (the same tensor the base layer and the other adapters
reading it hold). Gradients for A and B come back in the adapters' own dtype (fp32 master copies).

It plugs into peft through its LoRA-variant slot (`LoraLayer.lora_variant`, the hook DoRA uses)
and peft's `cast_input_dtype_enabled` switch; the adapter, its config and saved files stay plain
LoRA. `speed.fused_lora: false` keeps peft's own forward.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora.layer import LoraLayer, LoraVariant


class _LoraAdd(torch.autograd.Function):
    """`result + scaling * (x @ A.T) @ B.T`, computed in `result`'s dtype."""

    @staticmethod
    def forward(ctx: Any, result: torch.Tensor, x: torch.Tensor, weight_a: torch.Tensor, weight_b: torch.Tensor,
                scaling: float) -> torch.Tensor:
        ctx.dtypes = (x.dtype, weight_a.dtype, weight_b.dtype)
        with torch.autocast(x.device.type, enabled=False):  # the dtype is chosen here, not by autocast
            dtype = result.dtype
            a, b = weight_a.to(dtype), weight_b.to(dtype)
            x = x.to(dtype)  # a no-op when the input is already in the compute dtype (the usual case)
            x_a = x.reshape(-1, x.shape[-1]) @ a.t()
            # Written through a 2-D view into a tensor of the output's shape: the function must not
            # return a view (models such as Falcon add into a linear's output in place).
            out = torch.empty(result.shape, dtype=dtype, device=result.device)
            torch.addmm(result.reshape(-1, result.shape[-1]), x_a, b.t(), alpha=scaling, out=out.view(-1, result.shape[-1]))
        ctx.save_for_backward(x, x_a, a, b)
        ctx.scaling = scaling
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, x_a, a, b = ctx.saved_tensors
        need_result, need_x, need_a, need_b, _ = ctx.needs_input_grad
        with torch.autocast(grad.device.type, enabled=False):
            g = grad.reshape(-1, grad.shape[-1]).to(a.dtype)
            g_xa = (g @ b).mul_(ctx.scaling)  # tokens x r
            grad_x = (g_xa @ a).view(x.shape).to(ctx.dtypes[0]) if need_x else None
            grad_a = (g_xa.t() @ x.reshape(-1, x.shape[-1])).to(ctx.dtypes[1]) if need_a else None
            grad_b = (g.t() @ x_a).mul_(ctx.scaling).to(ctx.dtypes[2]) if need_b else None
        return grad if need_result else None, grad_x, grad_a, grad_b, None


class FusedLora(LoraVariant):
    """Plain LoRA with `_LoraAdd` as its forward; merging is plain LoRA's."""

    @staticmethod
    def init(module: LoraLayer, adapter_name: str, **kwargs: Any) -> None:
        """Nothing to create: the adapter's A and B are the plain LoRA ones."""

    @staticmethod
    def merge_safe(module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight + module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data += module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def unmerge(module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight - module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def forward(module: LoraLayer, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        lora_a, lora_b = module.lora_A[active_adapter], module.lora_B[active_adapter]
        dropout, scaling = module.lora_dropout[active_adapter], module.scaling[active_adapter]
        if getattr(lora_a.weight, "ds_id", None) is not None:
            # DeepSpeed ZeRO-3 gathers a partitioned weight only when its module runs: call them.
            return result + lora_b(lora_a(dropout(x.to(lora_a.weight.dtype)))).to(result.dtype) * scaling
        return _LoraAdd.apply(result, dropout(x), lora_a.weight, lora_b.weight, scaling)


def _is_linear_lora(module: torch.nn.Module) -> bool:
    """A LoRA layer around a linear base (peft's Linear, or bitsandbytes' 8/4-bit ones)."""
    if not isinstance(module, LoraLayer) or not hasattr(module, "lora_A"):
        return False
    base = module.get_base_layer()
    return isinstance(base, torch.nn.Linear) or base.__class__.__name__ in ("Linear4bit", "Linear8bitLt")


def install_fused_lora(model: torch.nn.Module) -> int:
    """Give every plain LoRA linear adapter of `model` the fused forward. Adapters with a
    variant of their own (DoRA and others) keep it. Returns how many adapters were switched."""
    switched = 0
    for module in model.modules():
        if not _is_linear_lora(module):
            continue
        plain = [name for name in module.lora_A if name not in module.lora_variant]
        for name in plain:
            module.lora_variant[name] = FusedLora()
        switched += len(plain)
        if all(isinstance(module.lora_variant.get(name), FusedLora) for name in module.lora_A):
            module.cast_input_dtype_enabled = False  # the input reaches the variant in its own dtype
    return switched


__all__ = ["FusedLora", "install_fused_lora"]
