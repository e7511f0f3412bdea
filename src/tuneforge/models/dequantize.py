"""bitsandbytes' 4-bit dequantization with less host work per call.

`bitsandbytes.functional.dequantize_4bit` reaches its CUDA kernels through `torch.library`
operators: each call goes through the dispatcher and a dynamo-disabled wrapper, twice for a
double-quantized weight (its absmax is itself quantized). A QLoRA step dequantizes every linear
layer two or three times (forward, backward, recomputation), and in the profile of an 8B QLoRA
step the GPU waits for that host work (docs/benchmarks.md). On CUDA this module calls the same
kernels through bitsandbytes' CUDA backend functions, the ones those operators run; elsewhere,
or where a bitsandbytes version lacks them, it calls `bitsandbytes.functional.dequantize_4bit`.

    weight = dequantize_4bit(linear4bit.weight.data, linear4bit.weight.quant_state)
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import torch


class CudaKernels(NamedTuple):
    """bitsandbytes' CUDA backend functions (`bitsandbytes/backends/cuda/ops.py`)."""

    blockwise: Any  # (A, absmax, code, blocksize, dtype, out): 8-bit blockwise, the nested absmax
    four_bit: Any  # (A, absmax, blocksize, quant_type, dtype, out): NF4/FP4


@functools.cache
def cuda_kernels() -> CudaKernels | None:
    """The CUDA backend's functions, or None without CUDA or in a bitsandbytes without them."""
    if not torch.cuda.is_available():
        return None
    try:
        from bitsandbytes.backends.cuda import ops
    except (ImportError, AttributeError):
        return None
    blockwise = getattr(ops, "_dequantize_blockwise_impl", None)
    four_bit = getattr(ops, "_dequantize_4bit_impl", None)
    return CudaKernels(blockwise, four_bit) if blockwise and four_bit else None


def dequantize_4bit(packed: torch.Tensor, state: Any) -> torch.Tensor:
    """The dense weight of bitsandbytes' packed 4-bit `packed` with its `QuantState`."""
    # Under torch.compile, bitsandbytes' operators are what the graph can hold (a direct kernel
    # call would break it). A packed tensor in the old transposed layout ([1, n]) takes
    # bitsandbytes' own path too, which transposes its result back.
    kernels = None if torch.compiler.is_compiling() or not packed.is_cuda else cuda_kernels()
    if kernels is None or packed.shape[0] == 1 or (state.nested and state.state2.code.device != packed.device):
        import bitsandbytes.functional as bnb_functional

        return bnb_functional.dequantize_4bit(packed, state)
    return dequantize_4bit_with(kernels, packed, state)


def dequantize_4bit_with(kernels: CudaKernels, packed: torch.Tensor, state: Any) -> torch.Tensor:
    """What `bitsandbytes.functional.dequantize_4bit` computes, with `kernels` called directly."""
    absmax = state.absmax
    if state.nested:
        nested = torch.empty(absmax.shape, dtype=state.state2.dtype, device=packed.device)
        kernels.blockwise(absmax, state.state2.absmax, state.state2.code, state.state2.blocksize, state.state2.dtype, out=nested)
        absmax = nested.add_(state.offset)
        if absmax.dtype != torch.float32:
            absmax = absmax.float()
    out = torch.empty(state.shape, dtype=state.dtype, device=packed.device)
    kernels.four_bit(packed, absmax, state.blocksize, state.quant_type, state.dtype, out=out)
    return out


__all__ = ["CudaKernels", "cuda_kernels", "dequantize_4bit", "dequantize_4bit_with"]
