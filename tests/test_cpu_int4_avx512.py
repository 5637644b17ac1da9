"""Our AVX512/AMX int4 kernel: its layout, each of its paths, and the layer it serves.

How each path is forced, so that every machine tests every path its CPU can run:
- the ``kernel_path`` fixture replaces ``k4.path`` (the per-call choice) by one that returns the
  path under test: "vector", "expanded", "panel" and "gemm" run wherever AVX512-BF16 exists, "amx"
  and "amx_panel" too: on the CPU's tiles where it has AMX, else on tiles in software
  (``use_amx``: ``TREEQ_AMX_EMULATED=1``, amx_emulated.h); ``panel_path`` likewise for the two
  panel paths; the gemm path's weight layout by tests/test_cpu_kernels.py's
  ``gemm_layout`` fixture (oneDNN's blocked layout, or rows through ``F.linear``);
- the choice by token count is tested for both kinds of CPU; whether AMX is used is read when the
  kernel is chosen, and ``TREEQ_CPU_ISA=avx512_bf16`` forbids it (a machine with AMX stands in for
  one without);
- an AVX2-only CPU is stood in for by ``TREEQ_CPU_ISA=avx2``: the kernel declines with the reason
  and ``cpu_int4`` runs; a missing compiler by ``CXX`` naming none.
The whole file also passes with ``TREEQ_CPU_ISA`` set for the run (``avx512_bf16``: AMX cases
skipped; ``avx2``: every case that needs the kernel skipped, the decline tests run).
"""

import pytest
import torch
from test_cpu_kernels import BF16_TOLERANCE, bf16_product, error_ratio, gemm_layout, quant_linear  # noqa: F401

import treeq.kernels.blocked_gemm as gemm_blocks
from treeq.errors import TreeqError
from treeq.kernels import LinearFormat, cpu_isa, explain, select_kernel
from treeq.kernels import cpu_int4_avx512 as k4

# Both honour a TREEQ_CPU_ISA set for the whole run (standing in for an older CPU).
needs_kernel = pytest.mark.skipif(k4.unavailable() is not None, reason=f"cpu_int4_avx512: {k4.unavailable()}")
has_amx = k4.unavailable() is None and cpu_isa.allows("amx") and bool(k4.library()[0].treeq_amx_supported())
# The kernel's own paths sum exact products in fp32 and round the result to bf16 once; what
# separates those sums from the fp32 reference is summation order. A bf16 rounding anywhere
# else costs ~1e-3.
FP32_PATH_TOLERANCE = 1e-5


# The paths whose weights are the reference kernel's bf16 ones (dequantized once per call).
BF16_WEIGHT_PATHS = ("panel", "amx_panel", "gemm")


def use_amx(monkeypatch) -> None:
    """Let the AMX paths run in this test: on the CPU's tiles, or where it has none on tiles in
    software (amx_emulated.h); skipped where TREEQ_CPU_ISA forbids AMX or the kernel cannot run."""
    if k4.unavailable() is not None or not cpu_isa.allows("amx"):
        pytest.skip(k4.unavailable() or cpu_isa.forbidden("amx"))
    if not has_amx:
        monkeypatch.setenv(cpu_isa.AMX_EMULATED_ENV, "1")


def force_path(name: str, monkeypatch) -> str:
    if name.startswith("amx"):
        use_amx(monkeypatch)
    monkeypatch.setattr(k4, "path", lambda *call: name)
    return name


@pytest.fixture(params=["vector", "expanded", "panel", "amx", "amx_panel", "gemm"])
def kernel_path(request, monkeypatch):
    return force_path(request.param, monkeypatch)


@pytest.fixture(params=["panel", "amx_panel"])
def panel_path(request, monkeypatch):
    return force_path(request.param, monkeypatch)


def test_tile_layout_puts_input_pairs_of_16_outputs_in_each_row():
    codes = torch.randint(0, 16, (32, 64), dtype=torch.uint8)
    packed = k4.pack_tiles(codes).view(2, 2, 256)  # one unit of two blocks: [tile, block, bytes]
    block = packed[0, 1].view(8, 32)  # outputs 16..31, inputs 0..31
    rows = torch.stack([block & 15, block >> 4], 1).reshape(16, 16, 2)  # [pair p, output n, j]
    assert torch.equal(rows[5, 3], codes[16 + 3, 10:12])
    assert torch.equal(rows.permute(1, 0, 2).reshape(16, 32), codes[16:32, :32])


def random_state(n, k, gs, seed):
    """(kernel state, fp32 weight) for random codes, fp16 scales (as checkpoints hold) and zero points."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=gen)
    scales = (torch.rand(k // gs, n, generator=gen) * 0.1).half().float()
    zeros = torch.randint(0, 16, (k // gs, n), generator=gen).float()
    state = k4._State(
        k4.pack_tiles(codes), k4.per_block(scales, torch.float16), k4.per_block(zeros, torch.uint8), gs, None, has_amx
    )
    w = (codes.float() - zeros.repeat_interleave(gs, 0).t()) * scales.repeat_interleave(gs, 0).t()
    return state, w


def rounded_once(y: torch.Tensor, exact: torch.Tensor) -> bool:
    """Whether bf16 ``y`` is fp32 ``exact`` rounded to bf16 once, give or take the summation order:
    within half a bf16 step (2^-8 of the value at most) plus FP32_PATH_TOLERANCE of the typical
    output."""
    slack = FP32_PATH_TOLERANCE * float(exact.norm()) / exact.numel() ** 0.5
    return y.dtype == torch.bfloat16 and bool(((y.float() - exact).abs() <= exact.abs() * 2**-8 + slack).all())


@needs_kernel
@pytest.mark.parametrize("tokens", [1, 3, 16, 21, 40, 100])
@pytest.mark.parametrize("n", [48, 80])  # one partial unit of blocks; a full one and a partial one
def test_each_path_matches_fp32_reference(tokens, n, kernel_path, monkeypatch):
    # Checked to fail: every case of the kernel's own paths with (17 + zero) * scale as the group
    # offset in group_params; the vector, the expanded and the AMX path with their sums rounded to
    # bf16 after each group; every gemm case with zero + 1 in dequantize_tile; the AMX panel path
    # at 100 tokens with the 32-row chains' blocks and token rows swapped in their output, and with
    # a unit's odd last block left out of them.
    monkeypatch.setattr(gemm_blocks, "GEMM_BYTES", 64 * 192 * 2)  # several blocks, the last one partial
    state, w = random_state(n, 192, 64, tokens)
    x = torch.randn(tokens, 192, generator=torch.Generator().manual_seed(n)).bfloat16()
    y, exact = k4.matmul(state, x), x.float() @ w.t()
    if kernel_path == "gemm":  # the reference kernel's bf16 weight and product, exactly
        assert y.dtype == torch.bfloat16 and torch.equal(y, torch.nn.functional.linear(x, w.bfloat16()))
    elif kernel_path in BF16_WEIGHT_PATHS:  # the reference kernel's bf16 weight, fp32 sums, bf16 result
        assert rounded_once(y, x.float() @ w.bfloat16().float().t())
    else:  # the exact weight, fp32 sums, bf16 result
        assert rounded_once(y, exact)
    assert k4.matmul(state, x[:0]).shape == (0, n)


@needs_kernel
@pytest.mark.parametrize("n", [48, 144])  # 1 unit of 3 blocks; 3 units (4, 4, 1): odd on 2 threads
@pytest.mark.parametrize("tokens", [1, 9, 100])
def test_each_path_hands_out_half_units_where_units_do_not_divide_among_threads(n, tokens, kernel_path):
    """On 2 threads an odd number of units runs as half units of 2 blocks (1 where a unit has 3 or
    1): each half reads its tiles at its unit's stride."""
    # Checked to fail on every path but gemm with a half unit's tile stride taken as its own block
    # count (item_of), on AMX and with AMX forbidden.
    state, w = random_state(n, 192, 64, tokens)
    x = torch.randn(tokens, 192, generator=torch.Generator().manual_seed(n)).bfloat16()
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        y = k4.matmul(state, x)
    finally:
        torch.set_num_threads(before)
    exact = x.float() @ (w.bfloat16().float() if kernel_path in BF16_WEIGHT_PATHS else w).t()
    assert rounded_once(y, exact)


@needs_kernel
@pytest.mark.parametrize("tokens", [5, 37])
def test_panel_paths_carry_their_sums_across_panels(tokens, panel_path):
    """Layers wider than one panel (4096 inputs): each panel's sums go on from the last one's."""
    # Checked to fail on both paths with the sums zeroed at every panel, and with them loaded from
    # the wrong group of token rows.
    state, w = random_state(80, 4096 + 64, 64, tokens)
    x = torch.randn(tokens, 4096 + 64, generator=torch.Generator().manual_seed(tokens)).bfloat16()
    assert rounded_once(k4.matmul(state, x), x.float() @ w.bfloat16().float().t())


@needs_kernel
# Passes of 128 / 64 token rows, the last partial; 144 outputs: 9 blocks, units of 4, 4 and 1. 576
# outputs at 4096 inputs: 9 units of 512 KiB panels, more than the 4 a thread keeps (2 MiB), so the
# units run in groups, each through every pass.
@pytest.mark.parametrize("n,k,tokens", [(144, 2048, 549), (144, 4096, 300), (576, 4096, 150)])
@pytest.mark.parametrize("threads", [1, 2])
def test_panel_paths_keep_each_units_panel_across_passes_of_token_rows(n, k, tokens, threads, panel_path):
    """Long prompts run in passes of token rows (512 KiB of inputs each), each unit's panel
    dequantized in the first pass and reused by the later ones, whichever thread runs it."""
    # Checked to fail on both paths with every thread's units sharing one kept panel, with each
    # pass's rows taken from the first pass's, and (576 outputs) with the panels dequantized in the
    # first group only.
    state, w = random_state(n, k, 64, tokens)
    x = torch.randn(tokens, k, generator=torch.Generator().manual_seed(k)).bfloat16()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = k4.matmul(state, x)
    finally:
        torch.set_num_threads(before)
    assert rounded_once(y, x.float() @ w.bfloat16().float().t())


@needs_kernel
@pytest.mark.parametrize("layout", [gemm_blocks.PLAIN, *gemm_blocks.ONEDNN_BLOCK_ROWS])
@pytest.mark.parametrize("group_size", [32, 64, -1])
def test_dequantized_rows_are_the_reference_weight_exactly(group_size, layout):
    """The gemm path's weight in every layout (oneDNN's blocked ones whichever this CPU's oneDNN
    uses): every row block equals the reference kernel's bf16 weight, zero points (asymmetric) and
    act-order's input order included."""
    # Checked to fail with zero + 1 in dequantize_tile; rows with the fp32 products truncated to bf16
    # instead of rounded to nearest even; the blocked layouts with the 16-row blocks' offsets within
    # a block dropped; the 32-row one with the block size fixed at 64 rows.
    layer = quant_linear(4, group_size, False, group_size == 64, out_f=192)
    layer.select_kernel("cpu", torch.bfloat16, k4.KERNEL.name)
    st = layer.kernel_state
    reference = layer.dequantized_weight().to(torch.bfloat16)
    if st.perm is not None:
        reference = reference[:, st.perm]
    out = torch.empty(64, 256, dtype=torch.bfloat16)
    for lo in range(0, 192, 64):
        k4.dequantize_rows(st, lo, lo + 64, out.data_ptr(), layout)
        rows = reference[lo : lo + 64]
        expected = rows.reshape(-1) if layout == gemm_blocks.PLAIN else gemm_blocks.onednn_layout(rows, layout)
        assert torch.equal(out.view(-1), expected)


@needs_kernel
@pytest.mark.parametrize("group_size,desc_act", [(32, False), (64, True), (-1, False)])
@pytest.mark.parametrize("tokens", [1, 70])
@pytest.mark.usefixtures("gemm_layout")
def test_gemm_path_is_the_bf16_product_of_the_reference_weight(group_size, desc_act, tokens, monkeypatch):
    """Long prompts with AMX (forced here on every machine): exactly the bf16 model's F.linear on the
    reference kernel's weight, inputs in the kernel's order, in each layout, over several blocks of
    rows."""
    # Checked to fail: every onednn case with the 16-row blocks' offsets within 64 rows dropped in
    # treeq_int4_dequantize; every case with each block's rows taken from the next block.
    force_path("gemm", monkeypatch)
    layer = quant_linear(4, group_size, False, desc_act, out_f=192)
    layer.select_kernel("cpu", torch.bfloat16, k4.KERNEL.name)
    x = torch.randn(2, tokens, 256).to(torch.bfloat16)
    assert torch.equal(layer(x), bf16_product(layer, x, layer.kernel_state.perm))


@needs_kernel
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size,desc_act", [(32, False), (64, True), (128, True), (-1, False)])
@pytest.mark.parametrize("tokens", [1, 5, 33])
@pytest.mark.parametrize("bias", [True, False])  # without bias or act-order forward skips matmul_2d
def test_layer_matches_reference_kernel_within_bf16(sym, group_size, desc_act, tokens, bias, kernel_path):
    # Checked to fail: every act-order case with the permutation dropped in prepare; every case with
    # zeros + 1 in prepare; every case but gemm's with (17 + zero) * scale in group_params, and
    # gemm's with zero + 1 in dequantize_tile; every case without bias or act-order with forward's
    # direct call scaled by 1.01.
    layer = quant_linear(4, group_size, sym, desc_act, bias=bias)
    x = torch.randn(2, tokens, 256).to(torch.bfloat16)
    assert error_ratio(layer, k4.KERNEL.name, x) < BF16_TOLERANCE


def test_path_follows_the_token_count():
    tokens = (1, k4.EXPANDED_FROM - 1, k4.EXPANDED_FROM, 127, 128, k4.GEMM_FROM - 1, k4.GEMM_FROM)
    expected = ["vector", "vector", "expanded", "expanded", "panel", "panel", "gemm"]
    assert [k4.path(m, False, 128, 2048, 2048) for m in tokens] == expected
    tokens = (1, 191, 192, k4.GEMM_FROM - 1, k4.GEMM_FROM)
    assert [k4.path(m, True, 128, 1536, 576) for m in tokens] == ["amx", "amx", "amx_panel", "amx_panel", "gemm"]


def test_large_weights_go_to_the_gemm_later():
    # With AMX, a weight whose bf16 copy outgrows a core's L2 stays on the AMX panel path longer; the
    # bound is inclusive (1024 x 1024 is exactly 2 MiB in bf16). Without AMX the size does not matter.
    assert k4.GEMM_FROM < k4.AMX_GEMM_FROM_LARGE
    assert [k4.gemm_from(n, 1024, True) for n in (1024, 1040)] == [k4.GEMM_FROM, k4.AMX_GEMM_FROM_LARGE]
    assert k4.gemm_from(4096, 4096, False) == k4.GEMM_FROM
    tokens = (k4.GEMM_FROM, k4.AMX_GEMM_FROM_LARGE - 1, k4.AMX_GEMM_FROM_LARGE)
    assert [k4.path(m, True, 128, 2048, 2048) for m in tokens] == ["amx_panel", "amx_panel", "gemm"]


def test_panel_paths_take_over_in_proportion_to_the_group_size():
    # The AMX and the expanded path's per-group step costs more the smaller the groups.
    assert [k4.panel_from(g, True) for g in (32, 64, 128, 4096)] == [48, 96, 192, k4.PANEL_FROM_MAX]
    assert [k4.panel_from(g, False) for g in (32, 64, 128, 4096)] == [32, 64, 128, k4.PANEL_FROM_MAX]
    calls = ((95, 64, 64), (96, 64, 64), (255, 4096, 4096))  # tokens, group size, inputs
    assert [k4.path(m, True, g, 64, k) for m, g, k in calls] == ["amx", "amx_panel", "amx"]
    calls = ((63, 64, 64), (64, 64, 64), (255, 4096, 4096))
    assert [k4.path(m, False, g, 64, k) for m, g, k in calls] == ["expanded", "panel", "expanded"]


@needs_kernel
def test_amx_is_used_where_the_cpu_has_it_unless_forbidden(monkeypatch):
    layer = quant_linear(4, 64, True, False)
    layer.select_kernel("cpu", torch.bfloat16, k4.KERNEL.name)
    assert layer.kernel_state.amx == has_amx
    monkeypatch.setenv(cpu_isa.ENV, "avx512_bf16")  # as on a CPU without AMX, from the next selection
    layer.select_kernel("cpu", torch.bfloat16, k4.KERNEL.name)
    assert layer.kernel_state.amx is False


@needs_kernel
def test_amx_emulated_where_asked_and_not_past_the_cap(monkeypatch):
    """The software tiles make the kernel report AMX (so the AMX paths are chosen and run) only
    when asked for, and TREEQ_CPU_ISA still forbids them."""
    monkeypatch.delenv(cpu_isa.ENV, raising=False)  # a cap set for the whole run
    monkeypatch.setenv(cpu_isa.AMX_EMULATED_ENV, "1")
    assert "-DTREEQ_AMX_EMULATED" in k4.flags() and not any(f.startswith("-mamx") for f in k4.flags())
    layer = quant_linear(4, 64, True, False)
    layer.select_kernel("cpu", torch.bfloat16, k4.KERNEL.name)
    assert layer.kernel_state.amx is True
    monkeypatch.setenv(cpu_isa.ENV, "avx512_bf16")
    layer.select_kernel("cpu", torch.bfloat16, k4.KERNEL.name)
    assert layer.kernel_state.amx is False


@needs_kernel
def test_chosen_first_on_cpu_bf16_and_declines_what_it_cannot_run():
    assert select_kernel(LinearFormat(4, 128, False, True, 576, 1536), "cpu", torch.bfloat16).name == k4.KERNEL.name
    assert explain(LinearFormat(4, 16, True, False, 576, 1536), "cpu", torch.bfloat16)[k4.KERNEL.name] == (
        "group_size=16 not a multiple of 32"
    )


def test_declines_without_avx512_bf16_and_cpu_int4_runs(monkeypatch):
    """An AVX2-only CPU, stood in for by TREEQ_CPU_ISA=avx2 (read at each selection)."""
    monkeypatch.setenv(cpu_isa.ENV, "avx2")
    fmt = LinearFormat(4, 64, False, True, 256, 96)
    reason = explain(fmt, "cpu", torch.bfloat16)[k4.KERNEL.name]
    assert reason in ("avx512_bf16 instructions forbidden by TREEQ_CPU_ISA=avx2", k4.library()[1])
    layer = quant_linear(4, 64, False, True)
    x = torch.randn(2, 5, 256).to(torch.bfloat16)
    assert error_ratio(layer, "cpu_int4", x) < BF16_TOLERANCE
    layer.select_kernel("cpu", torch.bfloat16)
    assert layer.kernel.name == "cpu_int4"
    with pytest.raises(TreeqError, match=f"kernel '{k4.KERNEL.name}' cannot run this layer: .*avx512_bf16|AVX512"):
        layer.select_kernel("cpu", torch.bfloat16, k4.KERNEL.name)


def test_an_unknown_cpu_cap_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv(cpu_isa.ENV, "avx9000")
    with pytest.raises(TreeqError, match=r"^TREEQ_CPU_ISA='avx9000' is not one of avx2, avx512_bf16, amx; unset"):
        select_kernel(LinearFormat(4, 128, True, False, 256, 256), "cpu", torch.bfloat16)


def test_declines_with_the_reason_when_it_cannot_be_built(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("TREEQ_CACHE", str(tmp_path))
    k4.native.build.cache_clear()
    k4._built.cache_clear()
    try:
        reason = explain(LinearFormat(4, 128, True, False, 256, 256), "cpu", torch.bfloat16)[k4.KERNEL.name]
        assert reason.startswith("cannot run the C++ compiler") and "no-such-compiler" in reason
        assert select_kernel(LinearFormat(4, 128, True, False, 256, 256), "cpu", torch.bfloat16).name == "cpu_int4"
    finally:
        k4.native.build.cache_clear()
        k4._built.cache_clear()
