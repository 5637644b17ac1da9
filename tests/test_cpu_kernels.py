"""The fused CPU kernels against the reference kernel on the same bf16 inputs.

Tolerances are not round numbers but the reference kernel's own distance to the fp32 result in
bf16 (bf16 weight and input, fp32 sums, bf16 output), measured in each test on the same input:
a kernel may be at most BF16_TOLERANCE times as far. How each path is forced: the blocked GEMM of
``cpu_int4`` and ``cpu_int8`` by replacing their ``path`` (the GEMM also where the CPU emulates
bf16, where it would not be chosen), the op by setting ``GEMM_FROM`` beyond the tokens; the GEMM's
weight layout by the ``gemm_layout`` fixture (oneDNN's blocked layout wherever oneDNN takes it, rows
through ``F.linear`` by declaring that layout unknown); ``cpu_int4_avx512``'s paths in
tests/test_cpu_int4_avx512.py. Neither depends on the CPU's instruction sets beyond x86-64, so these
run under every ``TREEQ_CPU_ISA`` cap.
"""

import functools

import pytest
import torch
import torch.nn.functional as F

from treeq.config import QuantConfig
from treeq.kernels import (
    LinearFormat,
    blocked_gemm,
    cpu_dequantize,
    cpu_int4,
    cpu_int4_avx512,
    cpu_int8,
    cpu_int8_avx512,
    cpu_isa,
    select_kernel,
)
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
# torch's int8-weight op takes one bf16 scale per row (the checkpoint's is fp16 or fp32), an error
# of up to 2^-9 of each output that the reference kernel does not make: over 30 input seeds its ratio
# reached 1.59 (median 1.17-1.31) on the tests' layers.
INT8_OP_TOLERANCE = 2.0


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
    not cpu_dequantize.available(), reason=f"the GEMM path: {cpu_dequantize.library()[1]}"
)


@pytest.fixture(params=["onednn", "rows"])
def gemm_layout(request, monkeypatch):
    """The layout the GEMM path's dequantizers write, with blocks small enough for a test layer to
    take several: oneDNN's (skipped where this oneDNN holds weights otherwise) or plain rows."""
    if request.param == "onednn" and not blocked_gemm.onednn_block_rows(64, 256):
        pytest.skip("oneDNN here holds bf16 weights in none of the blocked layouts the dequantizers write")
    if request.param == "rows":
        monkeypatch.setattr(blocked_gemm, "onednn_block_rows", lambda rows, k: 0)
    monkeypatch.setattr(blocked_gemm, "GEMM_BYTES", 64 * 256 * 2)  # 64 rows of a 256-wide layer
    return request.param


def bf16_product(layer, x, perm=None):
    """What the GEMM path must return, bit for bit: bf16 F.linear on the reference kernel's weight
    rounded to bf16 (inputs in ``perm``'s order, if given), then the bias added in bf16."""
    w = layer.dequantized_weight().to(torch.bfloat16)
    if perm is not None:
        x, w = x[..., perm], w[:, perm]
    return F.linear(x, w) + layer.bias.to(torch.bfloat16)


@pytest.fixture(params=["op", pytest.param("gemm", marks=needs_dequantizer)])
def int4_op_path(request, monkeypatch):
    """cpu_int4's path, forced: torch's fused op, or the blocked bf16 GEMM (which runs also where
    the CPU emulates bf16, so every machine tests it)."""
    monkeypatch.setattr(cpu_int4, "path", lambda tokens, native_bf16: request.param)
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
@pytest.mark.parametrize("layout", [blocked_gemm.PLAIN, *blocked_gemm.ONEDNN_BLOCK_ROWS])
def test_int4_gemm_path_uses_the_reference_weight_exactly(layout):
    """Every output row block of the GEMM path's weight equals the reference kernel's in bf16, in
    every layout (oneDNN's blocked ones whichever this CPU's oneDNN uses), asymmetric zero points and
    act-order included."""
    # Checked to fail: every layout with zero + 1 in cpu_dequantize.cpp; rows with its fp32 products
    # truncated to bf16 instead of rounded to nearest even; the blocked layouts with the halves of
    # their pairs swapped; the 32-row one with the block size fixed at 64 rows in pair_slot.
    layer = quant_linear(4, 64, False, True, out_f=192)
    reference = layer.dequantized_weight().to(torch.bfloat16)
    scales, out = layer.scales.float(), torch.empty(64, 256, dtype=torch.bfloat16)
    for lo in range(0, 192, 64):
        cpu_int4.dequantize_rows(layer, scales, lo, lo + 64, out.data_ptr(), layout)
        rows = reference[lo : lo + 64]
        expected = rows.reshape(-1) if layout == blocked_gemm.PLAIN else blocked_gemm.onednn_layout(rows, layout)
        assert torch.equal(out.view(-1), expected)


@needs_dequantizer
@pytest.mark.parametrize("sym", [True, False])
def test_int8_gemm_path_uses_the_reference_weight_exactly(sym):
    # Checked to fail with 127 - zero as the shift in cpu_dequantize.cpp.
    layer = quant_linear(8, -1, sym, False, in_f=200, out_f=40)
    layer.select_kernel("cpu", torch.bfloat16, "cpu_int8")
    out = torch.empty(24, 200, dtype=torch.bfloat16)
    cpu_int8.dequantize_rows(layer.kernel_state, 16, 40, out.data_ptr())
    assert torch.equal(out, layer.dequantized_weight().to(torch.bfloat16)[16:40])


@needs_dequantizer
@pytest.mark.parametrize("kernel,bits,group_size,sym,desc_act", [
    ("cpu_int4", 4, 64, False, True), ("cpu_int4", 4, -1, True, False),
    ("cpu_int8", 8, -1, False, False), ("cpu_int8", 8, -1, True, False),
])  # fmt: skip
@pytest.mark.parametrize("tokens", [1, 70])
@pytest.mark.usefixtures("gemm_layout")
def test_gemm_path_is_the_bf16_product_of_the_reference_weight(
    kernel, bits, group_size, sym, desc_act, tokens, monkeypatch
):
    """Long prompts: the GEMM path's result is exactly the bf16 model's F.linear on the reference
    kernel's weight, in each layout, over several blocks of rows."""
    # Checked to fail: every case with each block's rows taken from the next block in blocked_gemm;
    # every cpu_int4 onednn case with the pairs' halves swapped in cpu_dequantize.cpp's layout 1 store
    # (cpu_int8 writes rows in either case).
    monkeypatch.setattr(cpu_int4, "path", lambda tokens, native_bf16: "gemm")
    monkeypatch.setattr(cpu_int8, "path", lambda tokens, native_bf16: "gemm")
    layer = quant_linear(bits, group_size, sym, desc_act, out_f=192)
    layer.select_kernel("cpu", torch.bfloat16, kernel)
    x = torch.randn(2, tokens, 256).to(torch.bfloat16)
    assert torch.equal(layer(x), bf16_product(layer, x))


def test_the_gemm_path_takes_over_at_its_token_count_where_bf16_is_native(monkeypatch):
    monkeypatch.setattr(cpu_dequantize, "available", lambda: True)
    for module in (cpu_int4, cpu_int8):
        tokens = (1, module.GEMM_FROM - 1, module.GEMM_FROM, 2048)
        assert [module.path(m, True) for m in tokens] == ["op", "op", "gemm", "gemm"]
        assert module.path(2048, False) == "op"  # bf16 emulated: the op is ahead at every count
    monkeypatch.setattr(cpu_dequantize, "available", lambda: False)  # no compiler: the op throughout
    assert cpu_int4.path(2048, True) == cpu_int8.path(2048, True) == "op"


@pytest.mark.parametrize("kernel,bits", [("cpu_int4", 4), ("cpu_int8", 8)])
def test_the_gemm_path_is_kept_for_cpus_with_native_bf16(kernel, bits, monkeypatch):
    """Read when the kernel is chosen: AVX2 (the cap standing in for such a CPU) means the op."""
    layer = quant_linear(bits, -1, True, False)
    layer.select_kernel("cpu", torch.bfloat16, kernel)
    assert layer.kernel_state.native_bf16 == cpu_isa.native_bf16()
    monkeypatch.setenv(cpu_isa.ENV, "avx2")
    layer.select_kernel("cpu", torch.bfloat16, kernel)
    assert layer.kernel_state.native_bf16 is False


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
def test_int8_per_row_matches_reference_within_bf16(sym, monkeypatch):
    # Checked to fail: the asymmetric case with the offset (127 - zero) * scale in CpuInt8.prepare;
    # both with codes - 127 as the signed weight, and with the op's sums rounded to bf16 every 32
    # inputs (summing the op over slices).
    monkeypatch.setattr(cpu_int8, "GEMM_FROM", 10**9)  # the op (the GEMM path: tests above)
    layer = quant_linear(8, -1, sym, False)
    x = torch.randn(4, 7, 256).to(torch.bfloat16)
    assert error_ratio(layer, "cpu_int8", x) < INT8_OP_TOLERANCE


def test_int8_op_on_zero_points_far_from_the_middle_is_as_close_as_the_reference(monkeypatch):
    """Rows of one sign put the zero point near a code's end, so the op's correction (128 - zero) *
    scale * sum(x) is as large as the product it corrects; positive inputs (as after SiLU) keep the
    sums from cancelling. Checked to fail (ratio 1.9) with the correction summed in bf16."""
    monkeypatch.setattr(cpu_int8, "GEMM_FROM", 10**9)  # the op
    gen = torch.Generator().manual_seed(3)
    w = torch.rand(96, 256, generator=gen) * 0.05 + 0.01 * torch.arange(96)[:, None] / 96
    stats = InputStats(256, torch.device("cpu"))
    stats.add(torch.randn(512, 256, generator=gen))
    result = make_method(QuantConfig(method="rtn", bits=8, group_size=-1, sym=False)).quantize(w, stats)
    assert (result.zeros < 16).all()  # far from 128
    layer = QuantLinear.from_result(LinearFormat(8, -1, False, False, 256, 96), result, None)
    x = (torch.rand(4, 7, 256, generator=gen) + 0.2).to(torch.bfloat16)
    assert error_ratio(layer, "cpu_int8", x) < 1.25


def test_selection_on_cpu():
    fmt = LinearFormat(4, 64, False, True, 576, 1536)
    fast = "cpu_int4" if cpu_int4_avx512.unavailable() else "cpu_int4_avx512"
    assert select_kernel(fmt, "cpu", torch.bfloat16).name == fast
    fp32 = "cpu_int4_fp32" if cpu_dequantize.available() else "torch"  # fp32: the reference's own weight
    assert select_kernel(fmt, "cpu", torch.float32).name == fp32
    low = "cpu_lowbit" if cpu_dequantize.available() else "torch"  # 2/3-bit: dequantize + GEMM
    assert select_kernel(LinearFormat(3, 64, True, False, 576, 1536), "cpu", torch.bfloat16).name == low
    int8 = "cpu_int8" if cpu_int8_avx512.unavailable() else "cpu_int8_avx512"  # its op, and panels beyond
    assert select_kernel(LinearFormat(8, -1, True, False, 576, 1536), "cpu", torch.bfloat16).name == int8
    assert select_kernel(LinearFormat(8, 64, True, False, 576, 1536), "cpu", torch.bfloat16).name == "torch"
    odd = LinearFormat(4, 32, True, False, 64, 40)
    from treeq.kernels import explain

    assert explain(odd, "cpu", torch.bfloat16)["cpu_int4"] == "out_features=40 not a multiple of 16"
