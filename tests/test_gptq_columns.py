"""GPTQ's native column loop (treeq/methods/gptq_columns.py) against its torch loop: the same
codes, scales and zero points bit for bit, in every arrangement of groups and blocks."""

import pytest
import torch
from test_methods import correlated_inputs, quantize

from treeq.methods import gptq, gptq_columns
from treeq.numerics import make_grid

needs_native = pytest.mark.skipif(gptq_columns.library()[0] is None, reason=f"{gptq_columns.library()[1]}")


def both_loops(monkeypatch, w, x, **cfg):
    calls = []
    real = gptq_columns.sweep

    def counted(*a):
        ran = real(*a)
        calls.append(ran)
        return ran

    monkeypatch.setattr(gptq_columns, "sweep", counted)
    native = quantize("gptq", w, x, **cfg)
    assert calls and all(calls), "the native loop did not run"
    monkeypatch.setattr(gptq_columns, "sweep", lambda *a: False)
    return native, quantize("gptq", w, x, **cfg)


@needs_native
@pytest.mark.parametrize(
    "cfg",
    [
        dict(bits=4, group_size=32),  # act-order, params met at group starts inside blocks
        dict(bits=4, group_size=32, desc_act=False),
        dict(bits=3, group_size=48, block_size=40),  # groups across block edges
        dict(bits=4, group_size=32, static_groups=True),  # groups in any order along the sweep
        dict(bits=2, group_size=-1, sym=True),
        dict(bits=8, group_size=64, clip_search=False),
        dict(bits=3, group_size=32, grid="half-step"),  # a grid offset, codes from 1
        dict(bits=4, group_size=32, grid="restricted"),
    ],
)
def test_native_columns_are_the_torch_loops_bit_for_bit(cfg, monkeypatch):
    x, w = correlated_inputs(n=1024, d=192), torch.randn(48, 192) * 0.02
    native, in_torch = both_loops(monkeypatch, w, x, **cfg)
    assert torch.equal(native.codes, in_torch.codes)
    assert torch.equal(native.scales, in_torch.scales)
    assert torch.equal(native.zeros, in_torch.zeros)
    assert torch.equal(native.g_idx, in_torch.g_idx)


@needs_native
@pytest.mark.parametrize("grid,bits,sym", [("minmax", 4, False), ("minmax", 3, True), ("half-step", 3, True)])
@pytest.mark.parametrize("begin,end", [(0, 40), (5, 17), (39, 40)])
def test_one_run_updates_the_block_as_the_torch_loop_does(grid, bits, sym, begin, end, monkeypatch):
    """Every updated weight and error, not only the codes they round to, bit for bit."""
    g = make_grid(grid, bits, sym)
    gen = torch.Generator().manual_seed(begin + end)
    rows, width, n_in = 24, 40, 56
    w1 = torch.randn(rows, width, generator=gen) * 0.02
    u = torch.randn(n_in, n_in, generator=gen).triu() * 0.1 + torch.eye(n_in)
    u1 = u[8:48, 8:48]  # a strided view, as GPTQ's block of chol(H^-1)^T
    group = torch.arange(width) // 8
    params = [g.params(w1[:, i : i + 8]) for i in range(0, width, 8)]
    scales, zeros = (torch.stack(t).contiguous() for t in zip(*params))
    results = []
    for native in (True, False):
        if not native:
            monkeypatch.setattr(gptq_columns, "sweep", lambda *a: False)
        w, codes, err = w1.clone(), torch.zeros(rows, n_in, dtype=torch.uint8), torch.zeros(rows, width)
        gptq._sweep(g, w, u1, begin, end, group, scales, zeros, codes[:, 3:], err)
        results.append((w, codes, err))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@needs_native
def test_a_grid_that_rounds_its_own_way_keeps_the_torch_loop(monkeypatch):
    """QRazor rounds ties away from zero; the native loop repeats Grid.quantize, so it declines."""
    x, w = correlated_inputs(n=512, d=64), torch.randn(16, 64) * 0.02
    calls = []
    real = gptq_columns.sweep
    monkeypatch.setattr(gptq_columns, "sweep", lambda *a: calls.append(real(*a)) or calls[-1])
    quantize("gptq", w, x, bits=4, group_size=8, grid="qrazor")
    assert calls and not any(calls)
