"""bitsandbytes' 4-bit dequantization through its CUDA backend functions: the same values as
`bitsandbytes.functional.dequantize_4bit`, with less host work per call."""

from __future__ import annotations

import pytest
import torch

bnb_functional = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is in the test extra")

from tuneforge.models import dequantize  # noqa: E402


def _ops_as_kernels(calls: list[str]) -> dequantize.CudaKernels:
    """bitsandbytes' own operators standing in for its CUDA functions (same arguments, writing
    into `out`), so the orchestration around them runs on a CPU."""

    def blockwise(A, absmax, code, blocksize, dtype, out):
        calls.append("blockwise")
        out.copy_(torch.ops.bitsandbytes.dequantize_blockwise.default(A, absmax, code, blocksize, dtype))

    def four_bit(A, absmax, blocksize, quant_type, dtype, out):
        calls.append("four_bit")
        out.copy_(torch.ops.bitsandbytes.dequantize_4bit.default(A, absmax, blocksize, quant_type, out.shape, dtype))

    return dequantize.CudaKernels(blockwise, four_bit)


@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_direct_kernel_calls_give_what_bitsandbytes_gives(nested, quant_type, dtype):
    torch.manual_seed(0)
    weight = torch.randn(50, 30, dtype=dtype)  # 1,500 values: the last block of 64 is partial
    packed, state = bnb_functional.quantize_4bit(weight, blocksize=64, compress_statistics=nested, quant_type=quant_type)
    calls: list[str] = []
    direct = dequantize.dequantize_4bit_with(_ops_as_kernels(calls), packed, state)
    expected = bnb_functional.dequantize_4bit(packed, state)
    assert direct.dtype == dtype and direct.shape == weight.shape
    torch.testing.assert_close(direct, expected, rtol=0, atol=0)
    assert calls == (["blockwise", "four_bit"] if nested else ["four_bit"])  # the absmax's own dequantization
    assert (direct - weight).abs().max() < weight.abs().max() / 4  # really the weight, at 4 bits


def test_without_cuda_bitsandbytes_own_path_runs(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("checks the path taken without CUDA")
    assert dequantize.cuda_kernels() is None
    weight = torch.randn(64, 32, dtype=torch.bfloat16)
    packed, state = bnb_functional.quantize_4bit(weight, compress_statistics=True, quant_type="nf4")
    calls = []
    original = bnb_functional.dequantize_4bit
    monkeypatch.setattr(bnb_functional, "dequantize_4bit", lambda *a, **k: calls.append(1) or original(*a, **k))
    torch.testing.assert_close(dequantize.dequantize_4bit(packed, state), original(packed, state), rtol=0, atol=0)
    assert calls == [1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bitsandbytes' CUDA kernels need a CUDA device")
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_on_cuda_the_kernels_are_called_directly_with_the_same_values(nested, dtype, monkeypatch):
    assert dequantize.cuda_kernels() is not None
    weight = torch.randn(4096, 1000, dtype=dtype, device="cuda")
    packed, state = bnb_functional.quantize_4bit(weight, compress_statistics=nested, quant_type="nf4")
    expected = bnb_functional.dequantize_4bit(packed, state)
    monkeypatch.setattr(bnb_functional, "dequantize_4bit", lambda *a, **k: pytest.fail("went through the operators"))
    torch.testing.assert_close(dequantize.dequantize_4bit(packed, state), expected, rtol=0, atol=0)
