"""Triton's in-place low-rank add (methods/low_rank_add.py), which compiled layers on a GPU use
for the fused adapter's `out += alpha * x_a @ B.T`: the same sums as `addmm_`, written in place.
On a GPU it runs compiled; where Triton is installed without a GPU, Triton's interpreter runs it
on the CPU (fp16: the interpreter computes through numpy, which has no bf16). CPU builds of torch
ship no Triton, so CI checks the compiled layers against eager instead (test_fused_lora.py)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tuneforge.methods import low_rank_add

# (rows, cols, rank, right factor transposed as the backward's A.T): ragged tile edges, ranks
# under and over the 16 that tl.dot needs.
SHAPES = [(100, 200, 16, False), (64, 128, 8, True), (33, 300, 64, True), (130, 129, 16, False)]


def _largest_errors(device: str, dtype: torch.dtype, shapes: list[tuple[int, int, int, bool]]) -> list[tuple[float, float, bool]]:
    """Per shape: the kernel's largest difference from addmm_, the tolerance, and whether it wrote in place."""
    generator = torch.Generator(device=device).manual_seed(0)
    found = []
    for rows, cols, rank, transposed in shapes:
        out = torch.randn(rows, cols, dtype=dtype, device=device, generator=generator)
        left = torch.randn(rows, rank, dtype=dtype, device=device, generator=generator)
        right = torch.randn(rank, cols, dtype=dtype, device=device, generator=generator)
        right_t = right.t() if transposed else right.t().contiguous()
        expected = out.float().addmm_(left.float(), right_t.float().t(), alpha=0.5)
        pointer = out.data_ptr()
        torch.ops.tuneforge.add_low_rank_(out, left, right_t, 0.5)
        # One rounding of the output's dtype, on values up to a few times sqrt(rank).
        tolerance = 4 * torch.finfo(dtype).eps * float(expected.abs().max())
        found.append((float((out.float() - expected).abs().max()), tolerance, out.data_ptr() == pointer))
    return found


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_kernel_adds_what_addmm_adds_in_place_on_a_gpu(dtype):
    assert low_rank_add.add_low_rank_ is not None  # Triton ships with CUDA builds of torch
    for error, tolerance, in_place in _largest_errors("cuda", dtype, [(4096, 14336, 16, False), *SHAPES]):
        assert in_place and error <= tolerance, (error, tolerance)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton, whose interpreter runs the kernel on a CPU")
def test_the_kernel_adds_what_addmm_adds_in_place_in_triton_s_interpreter():
    # The interpreter is chosen when the kernel is defined, at import: a process of its own.
    script = (
        "import json, torch\n"
        "from tests.methods.test_low_rank_add import SHAPES, _largest_errors\n"
        "print(json.dumps(_largest_errors('cpu', torch.float16, SHAPES)))\n"
    )
    environment = {**os.environ, "TRITON_INTERPRET": "1"}
    root = Path(__file__).resolve().parents[2]  # where `tests` imports from
    done = subprocess.run([sys.executable, "-c", script], env=environment, cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(found) == len(SHAPES)
    for error, tolerance, in_place in found:
        assert in_place and error <= tolerance, (error, tolerance)


def test_only_16_bit_gpu_outputs_with_contiguous_rows_take_the_kernel():
    """fp32 would run in TF32 inside tl.dot, which addmm does not; a CPU has no Triton kernel."""
    assert not low_rank_add.runs_on(torch.zeros(4, 8, dtype=torch.bfloat16))
    assert not low_rank_add.runs_on(torch.zeros(4, 8, dtype=torch.float32))
    if torch.cuda.is_available() and low_rank_add.add_low_rank_ is not None:
        assert low_rank_add.runs_on(torch.zeros(4, 8, dtype=torch.bfloat16, device="cuda"))
        assert not low_rank_add.runs_on(torch.zeros(8, 4, dtype=torch.bfloat16, device="cuda").t())
        assert not low_rank_add.runs_on(torch.zeros(4, 8, dtype=torch.float32, device="cuda"))
