"""The fused CPU kernels against the reference kernel on the same bf16 inputs.

Tolerances are not round numbers but the reference kernel's own distance to the fp32 result in
bf16 (bf16 weight and input, fp32 sums, bf16 output), measured in each test on the same input:
a kernel may be at most BF16_TOLERANCE times as far. How each path is forced: ``cpu_int4``'s
blocked GEMM by setting ``cpu_int4.GEMM_FROM`` (the op by setting it beyond the tokens);
``cpu_int4_avx512``'s paths in tests/test_cpu_int4_avx512.py.
"""

import functools

import pytest
import torch

from treeq.config import QuantConfig
from treeq.kernels import LinearFormat, cpu_int4, cpu_int4_avx512, select_kernel
from treeq.methods import InputStats, make_method
from treeq.runtime.quant_linear import QuantLinear


@functools.cache
def _gptq(bits, group_size, sym, desc_act, in_f, out_f, bias, seed):
    """(format, result, bias) of a real GPTQ run, once per setting: kernel tests reuse each many times."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=gen) * 0.05
    x = torch.randn(512, in_f, generator=gen) * torch.linspace(0.2, 3, in_f)
    stats = InputStats(in_f, torch.device("cpu"))
    stats.add(x)
    cfg = QuantConfig(method="gptq", bits=bits, group_size=group_size, sym=sym, desc_act=desc_act)
    result = make_method(cfg).quantize(w, stats)
    fmt = LinearFormat(bits, group_size, sym, result.reorders, in_f, out_f)
    return fmt, result, torch.randn(out_f, generator=gen) if bias else None


def quant_linear(bits, group_size, sym, desc_act, in_f=256, out_f=96, bias=True, seed=0):
    """A fresh QuantLinear from a real GPTQ run (act-order gives a genuinely permuted g_idx)."""
    return QuantLinear.from_result(*_gptq(bits, group_size, sym, desc_act, in_f, out_f, bias, seed))


# Measured worst case 1.35: the fused ops' bf16 scales and offsets, a second rounding where the
# bias is added to a bf16 product. Kernels that compute in fp32 and round once stay below 0.75.
# Each assertion below was seen to fail with the kernel broken on purpose (comments say how), then
# the kernel restored.
BF16_TOLERANCE = 1.5


def distance(y, exact):
    return float((y.float() - exact).norm() / exact.norm())


def error_ratio(layer, kernel, x):
    """The kernel's distance to the fp32 result over the reference kernel's in bf16, both fed the
    same bf16 input; 1.0 means as close as the reference kernel."""
    layer.select_kernel("cpu", torch.float32, "torch")
    exact = layer(x.float())
    layer.select_kernel("cpu", torch.bfloat16, "torch")
    reference = layer(x)
    layer.select_kernel("cpu", torch.bfloat16, kernel)
    y = layer(x)
    assert y.dtype == torch.bfloat16 and y.shape == exact.shape
    return distance(y, exact) / distance(reference, exact)


needs_dequantizer = pytest.mark.skipif(
    cpu_int4.dequantizer()[0] is None, reason=f"cpu_int4's GEMM path: {cpu_int4.dequantizer()[1]}"
)


@pytest.fixture(params=["op", pytest.param("gemm", marks=needs_dequantizer)])
def int4_op_path(request, monkeypatch):
    """cpu_int4's path: torch's fused op, or (forced by GEMM_FROM = 1) the blocked bf16 GEMM."""
    monkeypatch.setattr(cpu_int4, "GEMM_FROM", 1 if request.param == "gemm" else 10**9)
    return request.param


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size,desc_act", [(32, False), (64, True), (128, True), (-1, False)])
@pytest.mark.parametrize("tokens", [1, 5, 33])
def test_int4_matches_reference_within_bf16(sym, group_size, desc_act, tokens, int4_op_path):
    # Checked to fail: every op case with an off-by-one zero point in CpuInt4.prepare ((7 - zeros) *
    # scales); every gemm case with zero + 1 in gptq4_dequantize.cpp; 16 of the 24 gemm cases with
    # the GEMM's sums rounded to bf16 every 32 inputs (blocked_gemm summing F.linear over slices).
    layer = quant_linear(4, group_size, sym, desc_act)
    assert (layer.kernel_state is None) and bool(layer.fmt.desc_act) == desc_act
    x = torch.randn(2, tokens, 256).to(torch.bfloat16)
    assert error_ratio(layer, "cpu_int4", x) < BF16_TOLERANCE


@needs_dequantizer
def test_int4_gemm_path_uses_the_reference_weight_exactly():
    """Every output row block of the GEMM path's weight equals the reference kernel's in bf16,
    asymmetric zero points and act-order included."""
    # Checked to fail with zero + 1 in gptq4_dequantize.cpp, and with its fp32 products truncated to
    # bf16 instead of rounded to nearest even.
    layer = quant_linear(4, 64, False, True)
    reference = layer.dequantized_weight().to(torch.bfloat16)
    scales, out = layer.scales.float(), torch.empty(32, 256, dtype=torch.bfloat16)
    for lo in range(0, 96, 32):
        assert torch.equal(cpu_int4.dequantize_rows(layer, scales, lo, lo + 32, out), reference[lo : lo + 32])


def test_int4_act_order_permutation_matters():
    """Dropping the input permutation must break the result, so the test above can fail."""
    layer = quant_linear(4, 64, False, True)
    layer.select_kernel("cpu", torch.bfloat16, "cpu_int4")
    assert layer.kernel_state.perm is not None
    x = torch.randn(3, 256).to(torch.bfloat16)
    good = error_ratio(layer, "cpu_int4", x)
    layer.kernel_state.perm = None
    broken = layer.kernel.forward(layer, x).float()
    layer.select_kernel("cpu", torch.float32, "torch")
    exact = layer(x.float())
    layer.select_kernel("cpu", torch.bfloat16, "torch")
    assert distance(broken, exact) > 20 * good * distance(layer(x), exact)


@pytest.mark.parametrize("sym", [True, False])
def test_int8_per_row_matches_reference_within_bf16(sym):
    # Checked to fail: the asymmetric case with the offset (127 - zero) * scale in CpuInt8.prepare;
    # both with codes - 127 as the signed weight, and with the op's sums rounded to bf16 every 32
    # inputs (summing the op over slices).
    layer = quant_linear(8, -1, sym, False)
    x = torch.randn(4, 7, 256).to(torch.bfloat16)
    assert error_ratio(layer, "cpu_int8", x) < BF16_TOLERANCE


def test_selection_on_cpu():
    fmt = LinearFormat(4, 64, False, True, 576, 1536)
    fast = "cpu_int4" if cpu_int4_avx512.unavailable() else "cpu_int4_avx512"
    assert select_kernel(fmt, "cpu", torch.bfloat16).name == fast
    assert select_kernel(fmt, "cpu", torch.float32).name == "torch"  # fp32 keeps the exact path
    assert select_kernel(LinearFormat(3, 64, True, False, 576, 1536), "cpu", torch.bfloat16).name == "torch"
    assert select_kernel(LinearFormat(8, -1, True, False, 576, 1536), "cpu", torch.bfloat16).name == "cpu_int8"
    assert select_kernel(LinearFormat(8, 64, True, False, 576, 1536), "cpu", torch.bfloat16).name == "torch"
    odd = LinearFormat(4, 32, True, False, 64, 40)
    from treeq.kernels import explain

    assert explain(odd, "cpu", torch.bfloat16)["cpu_int4"] == "out_features=40 not a multiple of 16"
