"""The 8-bit per-row kernel for AVX512-BF16: ``cpu_int8``'s op for a few tokens, ``cpu_int4_avx512``'s
panel paths on the op's own int8 rows beyond, and with AMX the GEMM for the longest prompts.

Paths are forced by replacing ``k8.path``; the AMX paths run on the CPU's tiles where it has AMX,
else on tiles in software (``use_amx``), and are skipped under ``TREEQ_CPU_ISA=avx512_bf16``; the
vector ones run wherever AVX512-BF16 does; under
``TREEQ_CPU_ISA=avx2`` every case that needs the kernel is skipped and the decline test runs.
"""

import pytest
import torch
from test_cpu_int4_avx512 import needs_kernel, rounded_once, use_amx
from test_cpu_kernels import (
    BF16_TOLERANCE,
    INT8_OP_TOLERANCE,
    bf16_product,
    error_ratio,
    needs_dequantizer,
    quant_linear,
)

from treeq.kernels import LinearFormat, cpu_int4_avx512, cpu_isa, explain, select_kernel
from treeq.kernels import cpu_int8_avx512 as k8


def panel_layer(sym, in_f, out_f, amx, monkeypatch, path="panel"):
    if amx:
        use_amx(monkeypatch)
    monkeypatch.setattr(k8, "path", lambda *call: path)
    layer = quant_linear(8, -1, sym, False, in_f=in_f, out_f=out_f, bias=False)
    layer.select_kernel("cpu", torch.bfloat16, k8.KERNEL.name)
    layer.kernel_state.amx = amx
    return layer


def on_threads(threads, layer, x):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return layer(x)
    finally:
        torch.set_num_threads(before)


@needs_kernel
@pytest.mark.parametrize("amx", [False, True])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("in_f,out_f", [(256, 96), (4160, 208)])  # units 4 + 2; several panels, units 4+4+4+1
@pytest.mark.parametrize("tokens", [1, 17, 40])
@pytest.mark.parametrize("threads", [1, 2])  # 2 threads: half units where the units are odd
def test_panel_paths_multiply_the_reference_weight_with_fp32_sums(sym, in_f, out_f, tokens, threads, amx, monkeypatch):
    """Each weight is the reference kernel's bf16 one ((code - zero) * scale in fp32, rounded once),
    the sums fp32, the result rounded once to bf16."""
    # Checked to fail (AMX and vector): every case with 127 - zero as the shift in Int8Rows; with the
    # two halves of a row's 32 inputs swapped; with the transpose left out; with each tile's inputs
    # taken from the first tile's.
    layer = panel_layer(sym, in_f, out_f, amx, monkeypatch)
    x = torch.randn(tokens, in_f, generator=torch.Generator().manual_seed(tokens)).bfloat16()
    assert rounded_once(on_threads(threads, layer, x), x.float() @ layer.dequantized_weight().bfloat16().float().t())


@needs_kernel
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("in_f,out_f", [(256, 96), (256, 112), (4096, 80), (4160, 208)])  # units 4+2, 4+3, 4+1
@pytest.mark.parametrize("tokens", [1, 16, 17, 33, 48, 64, 100])  # groups of 16 token rows: 1 to 7, partial
@pytest.mark.parametrize("threads", [1, 2])
def test_amx_rows_panel_path_multiplies_the_reference_weight(sym, in_f, out_f, tokens, threads, monkeypatch):
    """The weights dequantized once per call as A tiles, the inputs transposed as B tiles: the same
    numbers as the other paths (4160 inputs, more than a panel holds: the AMX panel path's)."""
    # Checked to fail: with the transpose of the panel path's fill applied here too; with a pair's
    # second group of token rows taken from the first's; with a pair's second block of weights taken
    # from the first's; with the sums of the second group stored over the first's.
    layer = panel_layer(sym, in_f, out_f, True, monkeypatch, "amx_rows_panel")
    x = torch.randn(tokens, in_f, generator=torch.Generator().manual_seed(tokens)).bfloat16()
    assert rounded_once(on_threads(threads, layer, x), x.float() @ layer.dequantized_weight().bfloat16().float().t())


@needs_kernel
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("in_f,out_f", [(256, 96), (256, 112), (4096, 80), (4160, 208)])  # units 4+2, 4+3, 4+1
@pytest.mark.parametrize("tokens", [1, 8, 16, 17, 30, 33, 64, 65, 100, 130])  # 1-9 groups of 16; chunks of 4
@pytest.mark.parametrize("threads", [1, 2])
def test_vector_rows_panel_path_multiplies_the_reference_weight(sym, in_f, out_f, tokens, threads, monkeypatch):
    """The weights dequantized once per call as rows, the inputs transposed into chunks of token
    pairs, without AMX: the same numbers as the other paths, the last chain of a unit's 16, 32 or 64
    outputs 4, 2 or 4 wide (4160 inputs: sums carried from panel to panel)."""
    # Checked to fail: with a chain's outputs offset by one row in the panel; with every group of a
    # chunk reading the chunk's first group's inputs; with the last chunk's inputs laid out as whole
    # chunks; with the sums of a chain's second group stored over the first's; with the carried
    # sums not loaded (4160 inputs).
    layer = panel_layer(sym, in_f, out_f, False, monkeypatch, "rows_panel")
    x = torch.randn(tokens, in_f, generator=torch.Generator().manual_seed(tokens)).bfloat16()
    assert rounded_once(on_threads(threads, layer, x), x.float() @ layer.dequantized_weight().bfloat16().float().t())


@needs_kernel
@pytest.mark.parametrize("in_f,out_f", [(256, 112), (4160, 208)])
@pytest.mark.parametrize("tokens", [5, 16, 30, 64, 130])
def test_vector_rows_panel_path_equals_the_vector_panel_path_bit_for_bit(in_f, out_f, tokens, monkeypatch):
    """The same products (exact) added in the same order, whichever operand is broadcast."""
    # Checked to fail with each tile's input pairs taken in reverse order in the rows panel chain
    # (which rounded_once above still accepts).
    panel = panel_layer(False, in_f, out_f, False, monkeypatch, "panel")
    x = torch.randn(tokens, in_f, generator=torch.Generator().manual_seed(tokens)).bfloat16()
    expected = panel(x)
    monkeypatch.setattr(k8, "path", lambda *call: "rows_panel")
    assert torch.equal(panel(x), expected)


@needs_kernel
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("in_f,out_f", [(256, 96), (256, 112), (4096, 80), (4160, 208)])  # N % 3: 0, 1, 2, 1
@pytest.mark.parametrize("tokens", [1, 2, 5, 8, 9, 13, 14, 15, 31, 40])  # 3 outputs a step to 8, 2 to 14; passes
@pytest.mark.parametrize("threads", [1, 2])
def test_vector_rows_stream_path_multiplies_the_reference_weight(sym, in_f, out_f, tokens, threads, monkeypatch):
    """Few tokens without AMX: each weight dequantized into registers, its rows as they lie, every
    token's inputs copied tile by tile; the same numbers as the other paths, summed in another order.
    Beyond 14 tokens in passes of up to 8 (15: 8 + 7; 31: 4 x 8 but 7; 40: 5 x 8), the first pass
    keeping its rows' weights for the later ones."""
    # Checked to fail: with every output of a step reading its first row; with the outputs left over
    # from steps of 3 dropped; with every token reading the first token's inputs; with every tile's
    # inputs copied from the first tile; with the passes writing over each other; with the kept
    # weights not stored; with every pass copying the first pass's inputs.
    layer = panel_layer(sym, in_f, out_f, False, monkeypatch, "rows_stream")
    x = torch.randn(tokens, in_f, generator=torch.Generator().manual_seed(tokens)).bfloat16()
    assert rounded_once(on_threads(threads, layer, x), x.float() @ layer.dequantized_weight().bfloat16().float().t())


@needs_kernel
@pytest.mark.parametrize(
    "path,amx", [("panel", False), ("panel", True), ("amx_rows_panel", True), ("rows_panel", False)]
)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("in_f,out_f,tokens", [(2048, 144, 300), (4096, 576, 150)])  # one group; groups of units
def test_panel_paths_keep_each_units_panel_across_passes_of_token_rows(
    in_f, out_f, tokens, threads, path, amx, monkeypatch
):
    """Passes of 128 / 64 token rows, the last partial; each unit's panel dequantized once (as in
    tests/test_cpu_int4_avx512.py)."""
    # Checked to fail (AMX and vector, 1 and 2 threads) with every thread's units sharing one kept
    # panel, and (576 outputs) with the panels dequantized in the first group only.
    layer = panel_layer(False, in_f, out_f, amx, monkeypatch, path)
    x = torch.randn(tokens, in_f, generator=torch.Generator().manual_seed(3)).bfloat16()
    assert rounded_once(on_threads(threads, layer, x), x.float() @ layer.dequantized_weight().bfloat16().float().t())


@needs_kernel
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("in_f,out_f", [(256, 96), (4160, 208)])
@pytest.mark.parametrize("tokens", [1, 5, 16, 17, 32])  # one tile of token rows; two
@pytest.mark.parametrize("threads", [1, 2])
def test_amx_rows_path_multiplies_the_reference_weight_with_fp32_sums(sym, in_f, out_f, tokens, threads, monkeypatch):
    """Up to 32 tokens with AMX: the weights' rows as tiles, the inputs transposed; the same numbers
    as the panel paths."""
    # Checked to fail: every case with the sums stored into y untransposed, and with every block's
    # rows taken from its work item's first block; every case up to 16 tokens with every K tile's
    # inputs taken from the first's; 17 and 32 tokens with the second group's inputs taken from the
    # first group's, and with the second group's sums stored over the first's.
    use_amx(monkeypatch)
    monkeypatch.setattr(k8, "path", lambda *call: "amx_rows")
    layer = quant_linear(8, -1, sym, False, in_f=in_f, out_f=out_f, bias=False)
    layer.select_kernel("cpu", torch.bfloat16, k8.KERNEL.name)
    x = torch.randn(tokens, in_f, generator=torch.Generator().manual_seed(tokens)).bfloat16()
    assert rounded_once(on_threads(threads, layer, x), x.float() @ layer.dequantized_weight().bfloat16().float().t())


@needs_kernel
@needs_dequantizer
def test_gemm_path_is_the_bf16_product_of_the_reference_weight(monkeypatch):
    monkeypatch.setattr(k8, "path", lambda *call: "gemm")
    layer = quant_linear(8, -1, False, False, out_f=192)
    layer.select_kernel("cpu", torch.bfloat16, k8.KERNEL.name)
    x = torch.randn(2, 70, 256).to(torch.bfloat16)
    assert torch.equal(layer(x), bf16_product(layer, x))


@needs_kernel
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("kernel_path", ["op", "panel", "rows_panel", "rows_stream"])
def test_layer_matches_reference_kernel_within_bf16(sym, kernel_path, monkeypatch):
    # Checked to fail: the asymmetric case on the op with the op's offset dropped; every case on the
    # panel path with its weights scaled by 1.01 in Int8Rows.
    monkeypatch.setattr(k8, "path", lambda *call: kernel_path)
    layer = quant_linear(8, -1, sym, False)
    x = torch.randn(4, 7, 256).to(torch.bfloat16)
    assert error_ratio(layer, k8.KERNEL.name, x) < (INT8_OP_TOLERANCE if kernel_path == "op" else BF16_TOLERANCE)


def test_path_follows_the_token_count():
    gemm_from = cpu_int4_avx512.GEMM_FROM  # a weight that fits a core's L2 in bf16 (256 x 4096)
    rows_max, rows_panel_max = k8.AMX_ROWS_MAX, k8.AMX_ROWS_PANEL_MAX
    tokens = (1, k8.AMX_FROM - 1, k8.AMX_FROM, rows_max, rows_max + 1, rows_panel_max, rows_panel_max + 1, gemm_from)
    expected = ["op", "op", "amx_rows", "amx_rows", "amx_rows_panel", "amx_rows_panel", "panel", "gemm"]
    assert [k8.path(m, True, 256, 4096) for m in tokens] == expected
    # A larger one goes to the GEMM later (cpu_int4_avx512.gemm_from).
    assert k8.path(gemm_from, True, 4096, 4096) == "panel"
    # More inputs than one panel holds: the AMX panel path, which carries sums from panel to panel.
    assert k8.path(rows_max + 1, True, 256, cpu_int4_avx512.PANEL_INPUTS + 32) == "panel"
    # Without AMX the stream path for a few tokens, then the vector rows panel path where whole
    # groups of 16 token rows hold the tokens, but for 2; the stream path goes on to more tokens
    # where the layer has more outputs.
    wide_max, wide = k8.STREAM_WIDE_MAX, k8.STREAM_WIDE_FROM
    tokens = (1, k8.STREAM_FROM - 1, k8.STREAM_FROM, wide_max, wide_max + 1, 47, 49, k8.ROWS_PANEL_MAX, 80)
    expected = ["op", "op", "rows_stream", "rows_stream", "panel", "rows_panel", "panel", "rows_panel", "panel"]
    assert [k8.path(m, False, wide, 4096) for m in tokens] == expected
    tokens = (k8.STREAM_MAX, k8.STREAM_MAX + 1, 30, wide_max)
    assert [k8.path(m, False, wide - 16, 4096) for m in tokens] == ["rows_stream", "panel", "rows_panel", "rows_panel"]


def test_chosen_for_8_bit_rows_where_it_runs_and_declines_with_the_reason(monkeypatch):
    fmt = LinearFormat(8, -1, True, False, 576, 1536)
    fast = "cpu_int8" if k8.unavailable() else k8.KERNEL.name
    assert select_kernel(fmt, "cpu", torch.bfloat16).name == fast
    assert explain(LinearFormat(8, -1, True, False, 576, 40), "cpu", torch.bfloat16)[k8.KERNEL.name] == (
        "out_features=40 not a multiple of 16"
    )
    monkeypatch.setenv(cpu_isa.ENV, "avx2")  # as on a CPU without AVX512-BF16
    assert "AVX512_BF16" in explain(fmt, "cpu", torch.bfloat16)[k8.KERNEL.name].upper().replace("-", "_")
    assert select_kernel(fmt, "cpu", torch.bfloat16).name == "cpu_int8"
