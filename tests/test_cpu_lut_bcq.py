"""The LUT-GEMM kernel for BCQ weights (treeq/kernels/cpu_lut_bcq.py): each path against the
weight treeq.bcq dequantizes. ``TREEQ_CPU_ISA=avx2`` forces the AVX2 path on an AVX512 CPU, so both
run here; the dense path (long prompts) by lowering DENSE_FROM, and its native dequantizer alone."""

import pytest
import torch

from treeq import bcq
from treeq.errors import TreeqError
from treeq.kernels import blocked_gemm
from treeq.kernels import cpu_lut_bcq as lut

needs_kernel = pytest.mark.skipif(lut.unavailable() is not None, reason=f"cpu_lut_bcq: {lut.unavailable()}")
has_avx512 = lut.unavailable() is None and lut.library()[0].treeq_bcq_isa() == 2
# Table look-ups sum the same fp32 products in another order than x @ W^T.
FP32_TOLERANCE = 1e-5


@pytest.fixture(params=["avx512", "avx2"])
def isa_path(request, monkeypatch):
    if request.param == "avx512" and not has_avx512:
        pytest.skip("no AVX512F on this CPU")
    monkeypatch.setenv("TREEQ_CPU_ISA", "avx512_bf16" if request.param == "avx512" else "avx2")
    assert lut.path() == request.param
    return request.param


def fitted(n, k, gs, planes, seed=0):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    return bcq.fit(w, planes, gs, rounds=2)


def relative_error(y, reference):
    return float((y.double() - reference).abs().max() / reference.abs().max())


@needs_kernel
@pytest.mark.parametrize("planes", bcq.PLANES)
# k = 8704 at 9 and 17 tokens (AVX2: at any count) takes more tables than one chunk of groups holds
@pytest.mark.parametrize("n, k, gs", [(16, 8, 8), (32, 96, 24), (48, 256, 64), (16, 512, 512), (16, 8704, 64)])
@pytest.mark.parametrize("tokens", [1, 3, 6, 9, 17])  # tables per 8 tokens, AVX512 looks up 4 together
def test_the_kernel_multiplies_by_the_dequantized_weight(isa_path, planes, n, k, gs, tokens):
    weight = fitted(n, k, gs, planes)
    x = torch.randn(tokens, k, generator=torch.Generator().manual_seed(1))
    y = lut.matmul(lut.prepare(weight), x)
    assert relative_error(y, x.double() @ weight.dequantize().double().T) < FP32_TOLERANCE


@needs_kernel
def test_offsets_count_once_per_group(isa_path):
    """An all-zero alpha weight is its offsets: each output sums its groups' offset x input sums."""
    weight = fitted(16, 64, 16, 2)
    weight.alphas.zero_()
    x = torch.randn(2, 64)
    expected = x.view(2, 4, 16).sum(-1) @ weight.offsets
    assert torch.allclose(lut.matmul(lut.prepare(weight), x), expected, rtol=1e-6, atol=1e-6)


@needs_kernel
@pytest.mark.parametrize("planes", bcq.PLANES)
@pytest.mark.parametrize("n, k, gs, lo, hi", [(16, 8, 8, 0, 16), (48, 96, 24, 16, 48), (64, 256, 64, 0, 64),
                                              (32, 512, 512, 16, 32), (80, 128, 16, 32, 80)])  # fmt: skip
def test_the_native_dequantizer_is_bcq_dequantize_bit_for_bit(planes, n, k, gs, lo, hi):
    """Rows lo..hi of the weight from the kernel's layout equal treeq.bcq.dequantize's exactly. It has
    one path for every CPU (no TREEQ_CPU_ISA choice), so no ISA parameter."""
    # Checked to fail: every case with the offset added last in cpu_lut_bcq.cpp's dequantize_block
    # (the planes summed first); every case with the planes summed in reverse order; the 9 cases with
    # lo > 0 with the rows counted from 0 instead of lo.
    weight = fitted(n, k, gs, planes)
    out = torch.full((hi - lo, k), float("nan"))
    lut.dequantize_rows(lut.prepare(weight), lo, hi, out.data_ptr())
    assert torch.equal(out, weight.dequantize()[lo:hi])


@needs_kernel
@pytest.mark.parametrize("block_bytes", [None, 64 * 64 * 4])  # the whole layer; blocks of 64 rows, the last 48
def test_the_dense_path_is_the_fp32_product_of_the_fake_quant_weight(block_bytes, monkeypatch):
    """Long prompts: fp32 x @ W^T with W = treeq.bcq.dequantize's weight, the same torch.mm over the
    same blocks of rows, so bit for bit."""
    # Checked to fail: the blocked case with every block's rows taken from the first block; both
    # cases with the offset added last in dequantize_block.
    monkeypatch.setitem(lut.DENSE_FROM, 3, 4)
    if block_bytes is not None:
        monkeypatch.setattr(blocked_gemm, "FP32_GEMM_BYTES", block_bytes)
    weight = fitted(176, 64, 32, 3)
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    assert lut.path(4, 3) == "dense" and lut.path(3, 3) != "dense"
    rows = 176 if block_bytes is None else 64
    w, x32 = weight.dequantize(), x.float()
    expected = torch.cat([x32 @ w[lo : lo + rows].T for lo in range(0, 176, rows)], dim=1)
    assert torch.equal(lut.matmul(lut.prepare(weight), x), expected)


def test_each_number_of_planes_has_its_dense_threshold():
    assert set(lut.DENSE_FROM) == set(bcq.PLANES)
    assert lut.path(10**6, 2) != "dense" and lut.path(10**6, 3) == lut.path(10**6, 4) == "dense"


@pytest.mark.parametrize("n, k, gs, message", [(24, 64, 32, "out_features=24"), (32, 60, 20, "group_size=20")])
def test_shapes_the_kernel_cannot_run_are_refused_in_one_line(n, k, gs, message):
    weight = bcq.BCQWeight(
        torch.zeros(2, n, k // 8 if k % 8 == 0 else k // 8 + 1, dtype=torch.uint8),
        torch.ones(2, k // gs, n, dtype=torch.float16), torch.zeros(k // gs, n), gs,
    )  # fmt: skip
    with pytest.raises(TreeqError, match=message) as err:
        lut.prepare(weight)
    assert "\n" not in str(err.value)
