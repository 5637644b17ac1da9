import logging

import pytest
import torch

from treeq.config import QuantConfig
from treeq.methods import METHODS, InputStats, make_method, output_error


def correlated_inputs(n=2048, d=128, seed=0):
    """Activations with uneven channel scales and correlations, as real layer inputs have."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5
    scale = torch.exp(torch.randn(d, generator=g))
    return (torch.randn(n, d, generator=g) @ mix) * scale


def stats_for(x):
    s = InputStats(x.shape[1], torch.device("cpu"))
    for chunk in x.split(500):
        s.add(chunk)
    return s


def quantize(method, w, x, **cfg):
    return make_method(QuantConfig(method=method, **cfg)).quantize(w, stats_for(x))


def test_stats_is_the_mean_second_moment():
    x = correlated_inputs(n=1000)
    assert torch.allclose(stats_for(x).h, x.T @ x / 1000, rtol=1e-4, atol=1e-5)


def test_reported_loss_is_the_output_mse_on_the_calibration_inputs():
    x, w = correlated_inputs(), torch.randn(64, 128)
    result = quantize("rtn", w, x, bits=4, group_size=32)
    direct = ((x @ w.T - x @ result.weight().T) ** 2).mean().item()
    assert result.loss == pytest.approx(direct, rel=1e-3)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_gptq_beats_rtn_on_the_same_layer(bits, sym):
    x, w = correlated_inputs(), torch.randn(64, 128)
    rtn = quantize("rtn", w, x, bits=bits, group_size=32, sym=sym)
    gptq = quantize("gptq", w, x, bits=bits, group_size=32, sym=sym)
    assert gptq.loss < rtn.loss


@pytest.mark.parametrize("group_size", [-1, 32, 64])
@pytest.mark.parametrize("static_groups", [False, True])
def test_act_order_groups_and_codes_reconstruct_the_weight(group_size, static_groups):
    x, w = correlated_inputs(), torch.randn(64, 128)
    plain = quantize("gptq", w, x, bits=4, group_size=group_size, desc_act=False)
    ordered = quantize("gptq", w, x, bits=4, group_size=group_size, desc_act=True, static_groups=static_groups)
    gs = 128 if group_size == -1 else group_size
    counts = torch.bincount(ordered.g_idx.long(), minlength=128 // gs)
    assert torch.all(counts == gs)  # every group holds exactly group_size channels
    if static_groups or group_size == -1:
        assert torch.equal(ordered.g_idx, torch.arange(128, dtype=torch.int32) // gs)
    else:
        assert not torch.equal(ordered.g_idx, plain.g_idx)
    assert ordered.loss == pytest.approx(output_error(w, ordered.weight(), stats_for(x).h), rel=1e-5)
    assert ordered.loss < quantize("rtn", w, x, bits=4, group_size=group_size).loss


def test_gptq_raises_damping_when_cholesky_fails(caplog):
    x, w = correlated_inputs(), torch.randn(64, 128)
    stats = stats_for(x)
    # An indefinite H (as fp16 accumulation can produce): 1% damping cannot rescue it, more can.
    stats.h -= 0.03 * torch.diag(stats.h).mean() * torch.eye(128)
    stats.h = (stats.h + stats.h.T) / 2
    floor = torch.linalg.eigvalsh(stats.h).min()
    assert floor < 0
    with caplog.at_level(logging.WARNING):
        result = make_method(QuantConfig(method="gptq", bits=4, group_size=32)).quantize(w, stats)
    assert "retrying with more damping" in caplog.text
    assert torch.isfinite(result.weight()).all()


def test_dead_input_channels_are_zeroed_not_nan():
    x, w = correlated_inputs(), torch.randn(64, 128)
    x[:, :5] = 0
    result = quantize("gptq", w, x, bits=4, group_size=32)
    assert torch.isfinite(result.weight()).all()


def test_methods_registry_lists_rtn_and_gptq():
    assert {"rtn", "gptq"} <= set(METHODS)


def test_clip_search_defaults_to_the_methods_choice():
    assert QuantConfig(method="gptq").weights.clip_search is True
    assert QuantConfig(method="rtn").weights.clip_search is False
    assert QuantConfig(method="gptq", clip_search=False).weights.clip_search is False
    assert QuantConfig(method="rtn", clip_search=True).weights.clip_search is True
    assert make_method(QuantConfig(method="gptq")).grid.clip_search


def _has_avx512_bf16() -> bool:
    return getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()


# Each CPU's route, forced on this machine: ``TREEQ_CPU_ISA`` caps the instruction sets treeq may
# use (avx512_bf16: as a CPU without AMX, avx2: as one without native bf16). AMX cannot be switched
# on where it is missing, so its route is forced by name; oneDNN then ignores the bf16 mode it
# sets, but the route's rounding and the restored setting are still checked.
ROUTES = [
    pytest.param(
        "avx512_bf16",
        "kernel",
        marks=pytest.mark.skipif(not _has_avx512_bf16(), reason="no AVX512-BF16 on this CPU"),
        id="avx512_bf16-kernel",
    ),
    pytest.param("avx2", "fp32", id="avx2-fp32"),
    pytest.param(None, "onednn", id="amx-onednn"),
]


@pytest.mark.parametrize("isa, route", ROUTES)
def test_bf16_statistics_are_the_gram_matrix_of_the_rounded_inputs(monkeypatch, isa, route):
    """bf16 statistics round the inputs, never the products, so H stays positive semi-definite."""
    if isa is None:
        monkeypatch.setattr("treeq.methods.base.cpu_statistics", lambda: route)
    else:
        monkeypatch.setenv("TREEQ_CPU_ISA", isa)
    x = torch.randn(4, 255, 100) * torch.rand(100) * 5  # odd token and feature counts
    stats = InputStats(100, torch.device("cpu"), torch.bfloat16)
    assert stats.route == route
    for batch in x:
        stats.add(batch)
    rounded = x.reshape(-1, 100).bfloat16().double()
    exact = rounded.T @ rounded / rounded.shape[0]
    fp32 = InputStats(100, torch.device("cpu"))
    fp32.add(x)
    tol = dict(rtol=1e-5, atol=1e-6 * float(exact.abs().max()))
    assert torch.allclose(stats.h.double(), exact, **tol)
    assert not torch.allclose(fp32.h.double(), exact, **tol)  # rounding is real
    assert torch.linalg.eigvalsh(stats.h.double()).min() > -1e-9 * exact.abs().max()
    assert torch.backends.mkldnn.matmul.fp32_precision == "none"  # the setting is put back


def test_auto_calibrates_in_fp32_where_the_cpu_lacks_native_bf16(monkeypatch):
    from treeq.engine.calib_precision import calibration_dtype

    monkeypatch.setenv("TREEQ_CPU_ISA", "avx2")
    assert calibration_dtype("auto", torch.device("cpu")) == torch.float32
    assert InputStats(8, torch.device("cpu"), calibration_dtype("auto", torch.device("cpu"))).route == "fp32"
    if _has_avx512_bf16():
        monkeypatch.setenv("TREEQ_CPU_ISA", "avx512_bf16")
        assert calibration_dtype("auto", torch.device("cpu")) == torch.bfloat16


@pytest.mark.parametrize("rows, group", [(600, 64), (40, 4096)])
def test_clip_search_picks_each_rows_params_on_its_own(rows, group):
    """The search takes rows a few hundred at a time; no row's pick may depend on the others."""
    from treeq.numerics import make_grid

    grid = make_grid("minmax", 4, sym=False, clip_search=True)
    w = torch.randn(rows, group) * torch.rand(rows, 1) + torch.randn(rows, 1) * 0.1
    scale, zero = grid.params(w)
    one_by_one = [grid.params(w[i : i + 1]) for i in range(0, rows, 7)]
    assert torch.equal(scale[::7], torch.cat([s for s, _ in one_by_one]))
    assert torch.equal(zero[::7], torch.cat([z for _, z in one_by_one]))
