"""Our AVX512/AMX int4 kernel: its layout, both of its paths, and the layer it serves."""

import pytest
import torch
from test_cpu_kernels import quant_linear, relative_error

from treeq.kernels import LinearFormat, explain, select_kernel
from treeq.kernels import cpu_int4_avx512 as k4

needs_kernel = pytest.mark.skipif(k4.library()[0] is None, reason=f"cpu_int4_avx512: {k4.library()[1]}")


def test_tile_layout_puts_input_pairs_of_16_outputs_in_each_row():
    codes = torch.randint(0, 16, (32, 64), dtype=torch.uint8)
    packed = k4.pack_tiles(codes).view(2, 2, 256)  # one unit of two blocks: [tile, block, bytes]
    block = packed[0, 1].view(8, 32)  # outputs 16..31, inputs 0..31
    rows = torch.stack([block & 15, block >> 4], 1).reshape(16, 16, 2)  # [pair p, output n, j]
    assert torch.equal(rows[5, 3], codes[16 + 3, 10:12])
    assert torch.equal(rows.permute(1, 0, 2).reshape(16, 32), codes[16:32, :32])


def reference(codes, scales, zeros, gs, x):
    w = (codes.float() - zeros.repeat_interleave(gs, 0).t()) * scales.repeat_interleave(gs, 0).t()
    return x.float() @ w.t()


@needs_kernel
@pytest.mark.parametrize("tokens", [1, 3, 16, 21, 40])
@pytest.mark.parametrize("amx_from", [1, 10**6], ids=["amx", "vector"])
@pytest.mark.parametrize("n", [48, 80])  # one partial unit of blocks; a full one and a partial one
def test_both_paths_match_fp32_reference(tokens, amx_from, n):
    if amx_from == 1 and not k4.library()[0].treeq_amx_supported():
        pytest.skip("no AMX on this CPU")
    gen = torch.Generator().manual_seed(tokens)
    k, gs = 192, 64
    codes = torch.randint(0, 16, (n, k), generator=gen)
    scales = (torch.rand(k // gs, n, generator=gen) * 0.1).half().float()  # checkpoints hold fp16 scales
    zeros = torch.randint(0, 16, (k // gs, n), generator=gen).float()
    state = k4._State(
        k4.pack_tiles(codes), k4.per_block(scales, torch.float16), k4.per_block(zeros, torch.uint8), gs, None
    )
    x = torch.randn(tokens, k, generator=gen).bfloat16()
    y, ref = k4.matmul(state, x, amx_from), reference(codes, scales, zeros, gs, x)
    # Exact products, fp32 sums: summation order and the kernel's offset codes (1 + q/16) separate the two.
    assert float((y - ref).norm() / ref.norm()) < 1e-5
    assert k4.matmul(state, x[:0], amx_from).shape == (0, n)


@needs_kernel
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size,desc_act", [(32, False), (64, True), (128, True), (-1, False)])
@pytest.mark.parametrize("tokens", [1, 5, 33])
def test_layer_matches_reference_kernel_within_bf16(sym, group_size, desc_act, tokens):
    layer = quant_linear(4, group_size, sym, desc_act)
    x = torch.randn(2, tokens, 256).to(torch.bfloat16)
    assert relative_error(layer, "cpu_int4_avx512", x) < 1e-2


@needs_kernel
def test_chosen_first_on_cpu_bf16_and_declines_what_it_cannot_run():
    assert select_kernel(LinearFormat(4, 128, False, True, 576, 1536), "cpu", torch.bfloat16).name == k4.KERNEL.name
    assert explain(LinearFormat(4, 16, True, False, 576, 1536), "cpu", torch.bfloat16)[k4.KERNEL.name] == (
        "group_size=16 not a multiple of 32"
    )


def test_declines_with_the_reason_when_it_cannot_be_built(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("TREEQ_CACHE", str(tmp_path))
    k4._native.build.cache_clear()
    k4.library.cache_clear()
    try:
        reason = explain(LinearFormat(4, 128, True, False, 256, 256), "cpu", torch.bfloat16)[k4.KERNEL.name]
        assert reason.startswith("cannot run the C++ compiler") and "no-such-compiler" in reason
        assert select_kernel(LinearFormat(4, 128, True, False, 256, 256), "cpu", torch.bfloat16).name == "cpu_int4"
    finally:
        k4._native.build.cache_clear()
        k4.library.cache_clear()
