"""The clip search's native error pass (treeq/clip_error.py) against the same sums in torch, and
the clip search's choices with it against those without it."""

import pytest
import torch
from test_grids import GRID_BITS, weights

from treeq import clip_error
from treeq.numerics import CLIP_NORM, GRIDS, UniformGrid, make_grid

needs_native = pytest.mark.skipif(clip_error.library()[0] is None, reason=f"{clip_error.library()[1]}")
# Grids the clip search scores with Grid's own rounding (QRazor rounds and searches its own way).
SEARCHED = [(g, b) for g, b in GRID_BITS if g != "qrazor"]


def torch_errors(grid, w, s, z):
    return (w[None] - grid.fake_quantize(w[None], s[..., None], z[..., None])).abs().pow(CLIP_NORM).sum(dim=2)


def candidates(grid, w, count=9):
    """Scale and zero [count, rows] of the grid at clip ratios 1 .. 0.3, as the clip search tries them."""
    found = [grid.raw_params(w * r) for r in torch.linspace(1.0, 0.3, count)]
    s = torch.stack([s for s, _ in found]).to(torch.float16).float().clamp(min=1e-8)
    return s, torch.stack([z for _, z in found])


@needs_native
@pytest.mark.parametrize("grid,bits", SEARCHED)
@pytest.mark.parametrize("rows,cols", [(5, 1), (33, 7), (64, 64), (8, 576)])
def test_native_errors_are_torchs_sums(grid, bits, rows, cols):
    g = make_grid(grid, bits, sym=grid != "minmax")
    w = weights(rows, cols, seed=rows + cols)
    w[0] = 0  # a zero row: no error at all
    s, z = candidates(g, w)
    native = clip_error.errors(w, s, z, g.offset, g.min_code, g.maxq, CLIP_NORM)
    expected = torch_errors(g, w, s, z)
    assert native.shape == expected.shape
    assert torch.allclose(native, expected, rtol=5e-6, atol=0)
    if g.offset == 0:
        assert (native[:, 0] == 0).all()


@needs_native
def test_native_power_is_as_close_as_torchs():
    """With a scale too large to reach any level but zero's, each error is |w| itself: one element
    per row gives the power alone, over magnitudes from 1e-15 to 1e10 (their powers are normal fp32 numbers)."""
    e = torch.cat([torch.zeros(1), torch.logspace(-15, 10, 4001)])[:, None]
    s, z = torch.full((1, e.shape[0]), 1e30), torch.full((1, e.shape[0]), 8.0)
    native = clip_error.errors(e, s, z, 0.0, 0, 15, CLIP_NORM)[0].double()
    exact = e[:, 0].double() ** CLIP_NORM
    assert native[0] == 0
    assert ((native[1:] - exact[1:]).abs() / exact[1:]).max() < 2e-6


@needs_native
@pytest.mark.parametrize("grid,bits,sym", [("minmax", 4, False), ("minmax", 3, True), ("restricted", 3, True)])
def test_the_search_picks_what_it_picks_in_torch(grid, bits, sym, monkeypatch):
    """The native pass changes no pick except between candidates whose errors agree to about 1e-6,
    and never to a worse one by more than that."""
    g = make_grid(grid, bits, sym, clip_search=True)
    w = torch.cat([weights(512, 64, seed=s) for s in range(4)])
    native = g.params(w)
    monkeypatch.setattr(clip_error, "errors", lambda *a: None)
    in_torch = g.params(w)
    same = (native[0] == in_torch[0]) & (native[1] == in_torch[1])
    assert same.float().mean() > 0.998

    def error(params):
        return torch_errors(g, w, params[0][None], params[1][None])[0]

    assert (error(native) <= error(in_torch) * (1 + 1e-5)).all()


@pytest.mark.parametrize("name", [n for n in GRIDS if n != "qrazor"])
def test_params_from_range_is_declared_truly(name):
    """A grid that says its params read only each row's extremes gives the same params from them,
    at every clip ratio; one that does not, gives different ones somewhere."""
    g = make_grid(name, 3)
    w = weights(64, 64)
    w[1] = w[1].abs()  # rows of one sign too
    w[2] = -w[2].abs()
    extremes = torch.stack([w.amin(dim=1), w.amax(dim=1)], dim=1)
    same = all(
        all(torch.equal(a, b) for a, b in zip(g.raw_params(w * r), g.raw_params(extremes * r)))
        for r in torch.linspace(1.0, 0.2, 21)
    )
    assert same == g.params_from_range


def test_a_grid_that_rounds_its_own_way_is_scored_in_torch(monkeypatch):
    """The native pass repeats Grid.quantize; a grid overriding it is not sent there."""

    class Floor(UniformGrid):
        def quantize(self, w, scale, zero):
            return torch.clamp(torch.floor(w.float() / scale) + zero, self.min_code, self.maxq)

    calls = []
    monkeypatch.setattr(clip_error, "errors", lambda *a: calls.append(a))
    g = Floor(4, sym=False, clip_search=True)
    w = weights(32, 64)
    s, z = candidates(g, w)
    assert torch.equal(g._clip_errors(w, s, z), torch_errors(g, w, s, z))
    assert not calls
    UniformGrid(4, sym=False)._clip_errors(w, s, z)
    assert calls
