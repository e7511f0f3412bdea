"""`out += alpha * left @ right_t.T` in place, for a LoRA adapter's rank-r product, as one Triton
kernel that `torch.compile` keeps in place.

In eager mode the fused LoRA forward adds its product into the base output with `addmm_` (cuBLAS,
in place). Under `torch.compile` that in-place `addmm_` becomes an out-of-place `addmm`, and
ATen's out-of-place `addmm` first copies `out` into its new buffer: 15 ms of device-to-device
copies in a 407 ms step of offloaded, compiled QLoRA-8B (docs/benchmarks.md). Written as products
summed over r, inductor's own reduction kernels took over 200 ms a step instead. No
library covers a small-K matmul that adds into its input in place, so this is a kernel of our own:
each program reads a tile of `out`, adds the (rows x r) @ (r x cols) product computed with
`tl.dot` in fp32, and writes the tile back, one pass over `out`. As a `torch.library.triton_op`
it declares the mutation, so inductor reinplaces it and launches the kernel from its generated
code, without a Python operator call each time (a plain custom operator cost that on 672 calls a
step). Without Triton (CPU builds) `add_low_rank_` is None and the callers keep `addmm_`.
"""

from __future__ import annotations

from typing import Any

import torch

# The kernel's dtypes: tl.dot would run fp32 inputs in TF32, which addmm does not.
DTYPES = (torch.bfloat16, torch.float16)
BLOCK_ROWS, BLOCK_COLS = 64, 128


def _build() -> Any:
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def add_low_rank_kernel(out, left, right, rows, cols, out_row_stride, left_row_stride, left_rank_stride,
                            right_col_stride, right_rank_stride, alpha,
                            RANK: tl.constexpr, BLOCK_RANK: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
        row = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        col = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
        rank = tl.arange(0, BLOCK_RANK)
        a = tl.load(left + row[:, None] * left_row_stride + rank[None, :] * left_rank_stride,
                    mask=(row[:, None] < rows) & (rank[None, :] < RANK), other=0.0)
        b = tl.load(right + col[None, :] * right_col_stride + rank[:, None] * right_rank_stride,
                    mask=(col[None, :] < cols) & (rank[:, None] < RANK), other=0.0)
        update = tl.dot(a, b)  # accumulated in fp32
        inside = (row[:, None] < rows) & (col[None, :] < cols)
        tile = out + row[:, None] * out_row_stride + col[None, :]
        current = tl.load(tile, mask=inside)
        tl.store(tile, (current.to(tl.float32) + alpha * update).to(current.dtype), mask=inside)

    @torch.library.triton_op("tuneforge::add_low_rank_", mutates_args={"out"})
    def add_low_rank_(out: torch.Tensor, left: torch.Tensor, right_t: torch.Tensor, alpha: float) -> None:
        rows, cols = out.shape
        rank = left.shape[1]
        grid = (triton.cdiv(rows, BLOCK_ROWS), triton.cdiv(cols, BLOCK_COLS))
        torch.library.wrap_triton(add_low_rank_kernel)[grid](
            out, left, right_t, rows, cols, out.stride(0), left.stride(0), left.stride(1),
            right_t.stride(0), right_t.stride(1), alpha,
            RANK=rank, BLOCK_RANK=max(16, triton.next_power_of_2(rank)),  # tl.dot needs 16 at least
            BLOCK_ROWS=BLOCK_ROWS, BLOCK_COLS=BLOCK_COLS,
        )

    return add_low_rank_


# Built at import, outside any compiled region (dynamo would not trace the registration).
add_low_rank_ = _build()


def runs_on(out: torch.Tensor) -> bool:
    """Whether the kernel takes this output: on a GPU, 16-bit, rows contiguous."""
    return add_low_rank_ is not None and out.is_cuda and out.dtype in DTYPES and out.stride(-1) == 1


__all__ = ["add_low_rank_", "runs_on"]
