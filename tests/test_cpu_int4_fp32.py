"""cpu_int4_fp32 and cpu_int8_fp32: 4- and 8-bit layers of fp32 models through the native fp32
dequantizer and the fp32 GEMM, which must give the reference kernel's output bit for bit (same
weight, same product)."""

import ctypes

import pytest
import torch
from test_cpu_kernels import quant_linear

import treeq.kernels.blocked_gemm as gemm_blocks
from treeq.kernels import LinearFormat, cpu_dequantize, explain, select_kernel

needs_dequantizer = pytest.mark.skipif(not cpu_dequantize.available(), reason="no native dequantizer here")


@needs_dequantizer
@pytest.mark.parametrize("bits,kernel", [(4, "cpu_int4_fp32"), (8, "cpu_int8_fp32")])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size,desc_act", [(32, False), (64, True), (-1, False)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("tokens", [1, 37])
def test_output_is_the_reference_kernels_bit_for_bit(
    bits, kernel, sym, group_size, desc_act, bias, tokens, monkeypatch
):
    # Checked to fail: every case with zero + 1 in cpu_dequantize.cpp's gptq_block; every case with
    # each block's rows dequantized from row 0 instead of its own first row; every 8-bit case with
    # the second word of 8 inputs read from the first word's row (codes8), and the act-order ones
    # with code_at's word index i / (32 / B) taken as i / 8.
    # On Zen 4 the 37-token cases with a bias failed with the bias added after the GEMM (an AMX Xeon's
    # GEMM rounded both ways alike).
    monkeypatch.setattr(gemm_blocks, "FP32_GEMM_BYTES", 4 * 256 * 16)  # 64-row blocks: the 96 rows take two
    layer = quant_linear(bits, group_size, sym, desc_act, bias=bias)
    x = torch.randn(2, tokens, 256)
    layer.select_kernel("cpu", torch.float32, "torch")
    reference = layer(x)
    layer.select_kernel("cpu", torch.float32)
    assert layer.kernel.name == kernel
    assert torch.equal(layer(x), reference)


@pytest.mark.parametrize("bits,kernel", [(4, "cpu_int4_fp32"), (8, "cpu_int8_fp32")])
def test_declines_without_the_dequantizer_and_the_reference_kernel_runs(bits, kernel, monkeypatch):
    monkeypatch.setattr(cpu_dequantize, "library", lambda: (None, "no C++ compiler found"))
    fmt = LinearFormat(bits, 64, True, False, 256, 96)
    assert explain(fmt, "cpu", torch.float32)[kernel] == "no native dequantizer: no C++ compiler found"
    assert select_kernel(fmt, "cpu", torch.float32).name == "torch"
    assert explain(fmt, "cpu", torch.bfloat16)[kernel] == "dtype torch.bfloat16 not supported"


@pytest.mark.parametrize("dtype,onednn", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)])
def test_blocked_gemm_adds_the_bias_within_each_blocks_product(dtype, onednn, monkeypatch):
    # Every block's own slice of the bias, in every layout blocked_gemm writes: F.linear's output.
    monkeypatch.setattr(gemm_blocks, "FP32_GEMM_BYTES", 4 * 256 * 16)  # fp32: blocks of 64 rows
    monkeypatch.setattr(gemm_blocks, "GEMM_BYTES", 2 * 256 * 64)  # bf16: blocks of 64 rows
    w, bias = torch.randn(128, 256).to(dtype), torch.randn(128).to(dtype)
    x = torch.randn(37, 256).to(dtype)

    def rows(lo: int, hi: int, address: int, layout: int) -> None:
        block = w[lo:hi] if layout == gemm_blocks.PLAIN else gemm_blocks.onednn_layout(w[lo:hi], layout)
        ctypes.memmove(address, block.contiguous().data_ptr(), block.numel() * block.element_size())

    assert gemm_blocks.block_rows(128, 256, onednn, dtype)[0] == 64
    y = gemm_blocks.blocked_gemm(x, 128, rows, onednn=onednn, bias=bias)
    expected = torch.nn.functional.linear(x, w, bias)
    if dtype == torch.float32:  # the fp32 kernels' promise; bf16 products may round apart by a unit
        assert torch.equal(y, expected)
    else:
        torch.testing.assert_close(y, expected)
