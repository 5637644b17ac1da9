"""BCQ numerics (treeq/bcq.py): bit-plane layout, dequantization, fitting, the uniform-grid form."""

import pytest
import torch

from treeq import bcq
from treeq.errors import TreeqError
from treeq.numerics import HalfStepGrid, UniformGrid, dequantize_grouped


def gaussian(rows=64, cols=256, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def heavy_tailed(rows=64, cols=256, seed=0):
    torch.manual_seed(seed)
    return torch.distributions.StudentT(3.0).sample((rows, cols))


def rtn_asym(w, bits, gs):
    """Per-group asymmetric min/max round-to-nearest, through numerics' grid."""
    grid = UniformGrid(bits, sym=False)
    out = []
    for group in w.split(gs, dim=1):
        scale, zero = grid.params(group)
        out.append(grid.fake_quantize(group, scale[:, None], zero[:, None]))
    return torch.cat(out, dim=1)


def test_byte_k_bit_j_is_input_8k_plus_j_and_unpack_inverts_pack():
    signs = torch.rand(3, 5, 64, generator=torch.Generator().manual_seed(1)) > 0.5
    planes = bcq.pack_planes(signs)
    assert planes.shape == (3, 5, 8) and planes.dtype == torch.uint8
    assert bool(planes[2, 4, 3] >> 5 & 1) == bool(signs[2, 4, 3 * 8 + 5])
    assert torch.equal(bcq.unpack_planes(planes), signs)


def test_dequantize_is_offset_plus_signed_alphas_per_row_and_group():
    gen = torch.Generator().manual_seed(2)
    q, out, n_in, gs = 3, 4, 32, 16
    signs = torch.rand(q, out, n_in, generator=gen) > 0.5
    alphas = torch.rand(q, n_in // gs, out, generator=gen).half()
    offsets = torch.randn(n_in // gs, out, generator=gen)
    w = bcq.dequantize(bcq.pack_planes(signs), alphas, offsets, gs)
    r, c = 2, 21  # group 1
    expected = offsets[1, r] + sum(alphas[i, 1, r].float() * (1 if signs[i, r, c] else -1) for i in range(q))
    assert w[r, c] == expected


@pytest.mark.parametrize("planes", bcq.PLANES)
def test_each_round_lowers_or_keeps_every_rows_error(planes):
    w = heavy_tailed().reshape(-1, 32)
    errors = []
    for rounds in (0, 1, 2, 5):
        alphas, offsets, signs = bcq.fit_rows(w, planes, rounds, with_offset=True)
        errors.append(bcq._row_error(w, alphas, offsets, signs))
    for before, after in zip(errors, errors[1:]):
        assert bool((after <= before).all())
    assert errors[-1].sum() < 0.95 * errors[0].sum()


@pytest.mark.parametrize("with_offset", [True, False])
def test_the_stored_tensors_dequantize_to_the_fitted_levels(with_offset):
    w = gaussian(16, 64)
    fitted = bcq.fit(w, 3, 32, rounds=3, with_offset=with_offset)
    alphas, offsets, signs = bcq.fit_rows(w.reshape(-1, 32), 3, 3, with_offset)
    assert fitted.alphas.dtype == torch.float16 and fitted.offsets.dtype == torch.float32
    by_rows = bcq.combine(offsets[:, None], alphas[:, :, None], signs).reshape(16, 64)
    assert torch.equal(fitted.dequantize(), by_rows)
    assert with_offset or not fitted.offsets.any()


@pytest.mark.parametrize("weights", [gaussian, heavy_tailed])
@pytest.mark.parametrize("planes", bcq.PLANES)
def test_bcq_with_offset_is_no_worse_than_rtn_asym_at_the_same_group_size(weights, planes):
    w = weights()
    rtn = (w - rtn_asym(w, planes, 64)).pow(2).sum(dim=1)
    fitted = (w - bcq.fit(w, planes, 64, rounds=10).dequantize()).pow(2).sum(dim=1)
    assert bool((fitted <= rtn * (1 + 1e-6)).all())
    assert fitted.sum() < 0.9 * rtn.sum()


def test_nearest_signs_pick_the_closest_of_all_levels():
    gen = torch.Generator().manual_seed(3)
    alphas, offsets = torch.rand(3, 5, generator=gen), torch.randn(5, generator=gen)
    w = torch.randn(5, 40, generator=gen)
    patterns = [torch.tensor([(p >> i) & 1 for i in range(3)]).bool() for p in range(8)]
    levels = torch.stack([bcq.combine(offsets, alphas, p[:, None].expand(3, 5)) for p in patterns], 1)
    best = (w[:, :, None] - levels[:, None, :]).abs().amin(dim=2)
    chosen = bcq.combine(offsets[:, None], alphas[:, :, None], bcq.nearest_signs(w, alphas, offsets))
    assert torch.equal((w - chosen).abs(), best)


@pytest.mark.parametrize(
    "grid", [UniformGrid(2, sym=False), UniformGrid(3, sym=False), UniformGrid(4), HalfStepGrid(4)]
)
def test_a_uniform_grid_converts_to_bcq_exactly(grid):
    w, gs = heavy_tailed(32, 128) * 0.02, 32
    groups = w.reshape(32, -1, gs).transpose(0, 1)
    scales, zeros = (torch.stack(t) for t in zip(*(grid.params(g) for g in groups)))
    codes = grid.quantize(groups, scales[..., None], zeros[..., None]).transpose(0, 1).reshape(32, 128)
    g_idx = torch.arange(128) // gs
    uniform = dequantize_grouped(codes, scales.half(), zeros, g_idx, grid.name)
    converted = bcq.from_uniform(codes, scales.half(), zeros, grid.bits, gs, grid.offset)
    assert torch.equal(converted.dequantize(), uniform)


def test_uniform_conversion_refuses_a_scale_whose_half_fp16_cannot_hold():
    codes = torch.zeros(1, 8, dtype=torch.uint8)
    tiny = torch.tensor([[2.0**-24]]).half()  # the smallest fp16 subnormal: its half is not an fp16
    with pytest.raises(TreeqError, match="too small for fp16"):
        bcq.from_uniform(codes, tiny, torch.zeros(1, 1), 2, 8)


@pytest.mark.parametrize(
    "n_in, gs, planes, message", [(64, 12, 3, "multiple of 8"), (60, 40, 3, "dividing"), (64, 32, 5, "planes=5")]
)
def test_shapes_bcq_cannot_hold_are_refused_in_one_line(n_in, gs, planes, message):
    with pytest.raises(TreeqError, match=message):
        bcq.fit(torch.randn(4, n_in), planes, gs, rounds=0)
