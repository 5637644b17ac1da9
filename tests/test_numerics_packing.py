import pytest
import torch

from treeq import packing
from treeq.numerics import SUPPORTED_BITS, UniformGrid, dequantize_grouped


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_pack_unpack_round_trip_is_exact(bits):
    codes = torch.randint(0, 2**bits, (96, 40), generator=torch.Generator().manual_seed(bits))
    packed = packing.pack(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (96 * bits // 32, 40)
    assert torch.equal(packing.unpack(packed, bits).long(), codes)


def test_three_bit_codes_straddle_words_as_gptq_lays_them_out():
    # Code 10 starts at bit 30: its low two bits end word 0, its high bit opens word 1.
    codes = torch.zeros(32, 1, dtype=torch.long)
    codes[10] = 0b101
    words = packing.pack(codes, 3)
    assert (int(words[0, 0]) & 0xFFFFFFFF) == 0b01 << 30
    assert int(words[1, 0]) == 0b1


def test_four_bit_layout_matches_gptq():
    codes = torch.arange(8).reshape(8, 1)
    assert int(packing.pack(codes, 4)[0, 0]) == 0x76543210


def test_pack_refuses_rows_not_multiple_of_period():
    with pytest.raises(ValueError, match="multiple of 32"):
        packing.pack(torch.zeros(48, 2, dtype=torch.long), 3)


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_grid_codes_in_range_and_fake_quant_is_idempotent(bits, sym):
    grid = UniformGrid(bits, sym)
    w = torch.randn(16, 64)
    scale, zero = grid.params(w)
    assert scale.dtype == torch.float32 and torch.equal(scale, scale.half().float())
    codes = grid.quantize(w, scale[:, None], zero[:, None])
    assert codes.min() >= 0 and codes.max() <= grid.maxq
    if sym:
        assert torch.all(zero == 2 ** (bits - 1))
    fq = grid.fake_quantize(w, scale[:, None], zero[:, None])
    assert torch.equal(grid.fake_quantize(fq, scale[:, None], zero[:, None]), fq)
    # Half a step, plus what rounding the scale to fp16 moves the outermost level by.
    assert ((w - fq).abs() / scale[:, None]).max() <= 0.5 + 2 ** (bits - 1) * 2**-10


def test_zero_row_is_coded_exactly():
    grid = UniformGrid(4, False)
    w = torch.zeros(2, 8)
    scale, zero = grid.params(w)
    assert torch.equal(grid.fake_quantize(w, scale[:, None], zero[:, None]), w)


def test_dequantize_grouped_indexes_groups_by_g_idx():
    codes = torch.tensor([[0, 1, 2, 3]])
    scales = torch.tensor([[1.0], [10.0]])
    zeros = torch.tensor([[0], [1]])
    g_idx = torch.tensor([1, 0, 1, 0])
    out = dequantize_grouped(codes, scales, zeros, g_idx)
    assert out.tolist() == [[-10.0, 1.0, 10.0, 3.0]]
