"""The W8A8 kernel (AVX512-VNNI) and its portable reference: activation codes, int32 sums, outputs.

How each ISA level is covered: where the kernel can run, its quantizer and GEMM are compared bit
for bit with numerics.quantize_activation and int8_linear_reference; ``TREEQ_CPU_ISA=avx2``
stands in for a CPU without AVX512 (the kernel declines with the reason, the reference paths still
answer); ``avx512_bf16`` (a machine with AMX standing in for one without) still runs it. The whole
file also passes with ``TREEQ_CPU_ISA`` set for the run (``avx2``: the kernel's cases skipped).
"""

import pytest
import torch

from treeq import numerics
from treeq.errors import TreeqError
from treeq.kernels import cpu_isa
from treeq.kernels import w8a8_vnni as w8

needs_kernel = pytest.mark.skipif(w8.available() is not None, reason=f"w8a8_vnni: {w8.available()}")


def gen(seed):
    return torch.Generator().manual_seed(seed)


def awkward_activations(m, k, seed):
    """Random rows of very different sizes, an all-zero row, a row so small its scale underflows to
    0, values on exact half steps, and a row of the largest bf16 magnitudes."""
    g = gen(seed)
    x = torch.randn(m, k, generator=g) * torch.exp(torch.randn(m, 1, generator=g) * 4)
    if m > 2:
        x[1] = 0
        x[2] = torch.randn(k, generator=g) * 1e-43  # amax / 127 underflows to 0 in fp32
    if m > 4:
        x[3, :5] = torch.tensor([127.0, 0.5, 1.5, -2.5, 126.5])  # scale exactly 1: halves tie
        x[4] = torch.randn(k, generator=g) * 1e36
    return x


def test_reference_definition_on_hand_computed_values():
    # Checked to fail with round-half-away (torch.trunc(x + 0.5 * sign)) and with qmax = 2^(bits-1).
    x = torch.tensor([[3.0, 2.5, -0.5, 1.5, -3.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    codes, scale, zero = numerics.quantize_activation(x, bits=3)  # qmax 3, scale 1: halves to even
    assert codes.dtype == torch.int8 and codes.tolist() == [[3, 2, 0, 2, -3], [0] * 5]
    assert scale.tolist() == [1.0, 1.0] and zero.tolist() == [0, 0]
    codes, scale, zero = numerics.quantize_activation(torch.tensor([[-1.0, 3.0]]), bits=2, sym=False)
    assert scale.tolist() == [torch.tensor(4.0) / 3] and zero.tolist() == [1]  # round(0.75)
    assert codes.dtype == torch.uint8 and codes.tolist() == [[0, 3]]
    codes, scale, zero = numerics.quantize_activation(torch.tensor([[1.0, -2.0], [4.0, 0.0]]), 8, per_token=False)
    assert (
        scale.shape == () and float(scale) == float(torch.tensor(4.0) / 127) and codes.tolist() == [[32, -64], [127, 0]]
    )
    y = numerics.fake_quantize_activation(x.bfloat16(), bits=3)
    assert y.dtype == torch.bfloat16 and y.tolist() == [[3, 2, 0, 2, -3], [0] * 5]
    with pytest.raises(ValueError, match="bits=9"):
        numerics.quantize_activation(x, bits=9)


@needs_kernel
@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,k", [(1, 4096), (3, 77), (17, 1001), (128, 2304)])  # the last on threads
def test_kernel_quantizer_is_the_reference_bit_for_bit(m, k, dtype, bits, monkeypatch):
    # Checked to fail: with a multiply by the reciprocal of the scale in quantize_row (fp32, 8
    # bits); with rounding toward zero; with the scale of 0 left at 0 (the underflowing row).
    x = awkward_activations(m, k, seed=m * k).to(dtype)
    expected, scale, _ = numerics.quantize_activation(x, bits)
    monkeypatch.setattr(w8.numerics, "quantize_activation", None)  # the kernel's own, not a fallback
    codes, kernel_scale = w8.quantize_per_token(x, bits)
    assert codes.dtype == torch.int8 and torch.equal(codes, expected)
    assert kernel_scale.dtype == torch.float32 and torch.equal(kernel_scale, scale)


def random_gemm(m, n, k, seed):
    g = gen(seed)
    codes = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    w = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    return codes, torch.rand(m, generator=g) + 1e-3, w, torch.rand(n, generator=g) * 0.01, torch.randn(n, generator=g)


def exact_sums(codes, w):
    return (codes.long() @ w.long().T).to(torch.int32)


@pytest.mark.parametrize("m,n,k", [(1, 16, 64), (3, 50, 1001), (17, 200, 130), (2, 8, 3)])
def test_reference_sums_are_exact_int32(m, n, k):
    codes, xs, w, ws, _ = random_gemm(m, n, k, seed=n)
    assert torch.equal(w8.int8_linear_reference(codes, xs, w, ws, out_dtype=torch.int32), exact_sums(codes, w))


@needs_kernel
@pytest.mark.parametrize("m", [1, 3, 17, 128])
@pytest.mark.parametrize("n,k", [(16, 64), (50, 1001), (200, 130), (200, 1001), (8, 3)])
def test_kernel_sums_and_outputs_are_the_reference_exactly(m, n, k):
    # Checked to fail: with 127 * row sum as the correction in finish; with ws and xs multiplied in
    # the other order; with each chunk of inputs starting its sums from zero (n=200, k=1001: two
    # chunks of a 4-block unit).
    codes, xs, w, ws, bias = random_gemm(m, n, k, seed=m + n)
    packed = w8.pack_weight(w)
    assert torch.equal(w8.int8_linear(codes, xs, packed, ws, out_dtype=torch.int32), exact_sums(codes, w))
    for out_dtype in (torch.float32, torch.bfloat16):
        for b in (None, bias):
            y = w8.int8_linear(codes, xs, packed, ws, b, out_dtype)
            assert y.dtype == out_dtype and torch.equal(y, w8.int8_linear_reference(codes, xs, w, ws, b, out_dtype))
    assert w8.int8_linear(codes[:0], xs[:0], packed, ws).shape == (0, n)


@needs_kernel
def test_sums_beyond_fp32_exactness_and_every_thread_count():
    """All codes at +-127 and -128 over 4096 inputs: sums near 2^26, where fp32 would round. 90
    outputs: a last partial block, whose lanes past N must not be written (into the next row)."""
    # Checked to fail (a crash: loads and stores past the scales and the output) with the partial
    # block's mask dropped in finish.
    codes = torch.full((5, 4096), 127, dtype=torch.int8)
    codes[1] = -128
    w = torch.full((90, 4096), -127, dtype=torch.int8)
    w[3, ::2] = 127
    w[7, 1] = 1
    packed, expected = w8.pack_weight(w), exact_sums(codes, w)
    assert int(expected.abs().max()) > 2**24 + 1
    threads = torch.get_num_threads()
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            assert torch.equal(
                w8.int8_linear(codes, torch.ones(5), packed, torch.ones(90), out_dtype=torch.int32), expected
            )
    finally:
        torch.set_num_threads(threads)


def outlier_case(seed):
    """Activations with a few columns 100x the rest, as LLM.int8() describes them, and a weight."""
    g = gen(seed)
    x = torch.randn(9, 256, generator=g)
    outliers = torch.tensor([5, 77, 200])
    x[:, outliers] *= 100
    w = torch.randn(40, 256, generator=g) * 0.05
    inliers = w.index_fill(1, outliers, 0)
    scale = inliers.abs().amax(dim=1) / 127
    w_int8 = torch.round(inliers / scale[:, None]).to(torch.int8)
    return x, outliers, w, w_int8, scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_outlier_path_keeps_outlier_columns_in_full_precision(dtype):
    # Checked to fail with the outlier columns left in the quantized activations (error ratio ~0.1).
    x, outliers, w, w_int8, scale = outlier_case(seed=1)
    x = x.to(dtype)
    bias = torch.randn(40)
    y = w8.int8_linear_outliers(x, outliers, w[:, outliers], w_int8, scale, bias, linear=w8.int8_linear_reference)
    exact = x.double() @ w.double().T + bias.double()
    assert y.dtype == dtype
    assert float((y.double() - exact).norm() / exact.norm()) < 0.01
    codes, xs = w8.quantize_per_token(x)
    plain = w8.int8_linear_reference(codes, xs, w_int8, scale, bias, torch.float32)
    assert float((plain.double() - exact).norm() / exact.norm()) > 0.1  # what the split avoids


@needs_kernel
def test_outlier_path_through_the_kernel_is_the_reference_exactly():
    x, outliers, w, w_int8, scale = outlier_case(seed=2)
    args = (x.bfloat16(), outliers, w[:, outliers].bfloat16())
    y = w8.int8_linear_outliers(*args, w8.pack_weight(w_int8), scale, out_dtype=torch.float32)
    expected = w8.int8_linear_outliers(*args, w_int8, scale, out_dtype=torch.float32, linear=w8.int8_linear_reference)
    assert torch.equal(y, expected)


def test_declines_without_avx512_and_the_reference_paths_answer(monkeypatch):
    """An AVX2-only CPU, stood in for by TREEQ_CPU_ISA=avx2 (read at each call)."""
    monkeypatch.setenv(cpu_isa.ENV, "avx2")
    assert w8.available() in ("AVX512-VNNI (level avx512_bf16) forbidden by TREEQ_CPU_ISA=avx2", w8.library()[1])
    x = awkward_activations(17, 1001, seed=3).bfloat16()
    codes, scale = w8.quantize_per_token(x)
    expected, expected_scale, _ = numerics.quantize_activation(x, 8)
    assert torch.equal(codes, expected) and torch.equal(scale, expected_scale)
    w = torch.randint(-127, 128, (24, 1001), generator=gen(4), dtype=torch.int8)
    assert torch.equal(
        w8.int8_linear_reference(codes, scale, w, torch.ones(24), out_dtype=torch.int32), exact_sums(codes, w)
    )
    with pytest.raises(TreeqError, match="w8a8_vnni: .*(avx512_bf16|AVX512)"):
        w8.pack_weight(w)


@needs_kernel
def test_runs_at_the_avx512_bf16_level_and_refuses_bad_arguments(monkeypatch):
    monkeypatch.setenv(cpu_isa.ENV, "avx512_bf16")  # as on a machine with AVX512 but no AMX
    assert w8.available() is None
    packed = w8.pack_weight(torch.zeros(16, 64, dtype=torch.int8))
    with pytest.raises(TreeqError, match=r"codes must be int8 \[tokens, 64\]"):
        w8.int8_linear(torch.zeros(2, 63, dtype=torch.int8), torch.ones(2), packed, torch.ones(16))
    with pytest.raises(TreeqError, match="out_dtype"):
        w8.int8_linear(torch.zeros(2, 64, dtype=torch.int8), torch.ones(2), packed, torch.ones(16), None, torch.float16)
    with pytest.raises(TreeqError, match="above 65536"):
        w8.pack_weight(torch.zeros(16, 65537, dtype=torch.int8))
