"""SpQR: GPTQ with second-level quantized scales and fp16 outliers in a sparse residual; its compact
checkpoint format (exact both ways) and what inspect counts."""

import math

import pytest
import torch
from test_weight_extras import quantize_and_load

import treeq
from treeq.errors import TreeqError
from treeq.extras.spqr import SpQRExtras, scales_from_statistics
from treeq.formats.spqr import from_spqr, to_spqr
from treeq.methods.base import InputStats
from treeq.methods.spqr import SpQR
from treeq.numerics import dequantize_grouped
from treeq.runtime.quant_linear import QuantLinear


def layer_problem(out=64, n_in=128, seed=0):
    """A weight with a few large entries and inputs of uneven channel scales."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n_in, generator=g) * 0.02
    w[torch.rand(out, n_in, generator=g) < 0.005] *= 25
    x = torch.randn(2048, n_in, generator=g) * torch.rand(n_in, generator=g) * 2
    return w, x


def quantize(w, x, **options):
    cfg = treeq.QuantConfig(method="spqr", bits=3, group_size=16, sym=False, options=options)
    method = SpQR(cfg)
    stats = method.stats(w.shape[1], torch.device("cpu"))
    stats.add(x)
    return method.quantize(w, stats)


def test_outliers_are_kept_whole_and_the_dense_part_is_zero_there():
    w, x = layer_problem()
    r = quantize(w, x)
    e: SpQRExtras = r.extras
    assert 0 < e.nnz < 0.05 * w.numel()
    dense = dequantize_grouped(r.codes, r.scales, r.zeros, r.g_idx, r.grid)
    kept = e.add_to(torch.zeros_like(w)) != 0
    assert torch.equal(dense[kept], torch.zeros(int(kept.sum())))
    assert torch.equal(r.weight(), dense + e.add_to(torch.zeros_like(w)))
    # The scales are exactly what the stored second-level statistics give; zero points are integers.
    assert torch.equal(r.scales, scales_from_statistics(*e.statistics()))
    assert int(e.tensors["scale_codes"].max()) <= 7 and e.tensors["scale_step"].shape == (128 // 16, 64 // 16)
    assert torch.equal(r.zeros, r.zeros.clamp(0, 7))
    assert r.reorders  # act-order by default


def test_outliers_and_small_groups_lower_the_layer_error():
    w, x = layer_problem()
    with_outliers = quantize(w, x).loss
    without = quantize(w, x, outlier_threshold=math.inf)
    assert without.extras.nnz == 0
    cfg = treeq.QuantConfig(method="gptq", bits=3, group_size=64, sym=False)
    gptq = treeq.methods.METHODS["gptq"](cfg)
    stats = InputStats(w.shape[1], torch.device("cpu"))
    stats.add(x)
    assert with_outliers < 0.5 * without.loss < 0.5 * gptq.quantize(w, stats).loss


def _state(r, name="m"):
    layer = QuantLinear.from_result(
        treeq.kernels.LinearFormat(3, 16, False, True, r.codes.shape[1], r.codes.shape[0], extras="spqr"), r, None
    )
    return {f"{name}.{k}": v for k, v in layer.state_dict().items()}


def test_the_compact_layout_converts_exactly_both_ways():
    w, x = layer_problem()
    state = _state(quantize(w, x))
    stored = to_spqr(state, stats_bits=3, group_size=16)
    assert not {"m.scales", "m.g_idx", "m.residual_rows"} & set(stored)
    assert stored["m.scale_codes"].numel() == 128 // 16 * 64 * 3 // 32  # 3-bit codes in int32 words
    assert stored["m.group_index"].numel() == 128 * 3 // 32  # 8 groups: 3 bits per input channel
    assert stored["m.residual_counts"].dtype == torch.uint8
    back = from_spqr(stored, stats_bits=3, group_size=16, bits_of=lambda _: 3)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state), [k for k in state if not torch.equal(back[k], state[k])]
    # Scales that are not what the statistics give are refused, not rounded.
    state["m.scales"] = state["m.scales"].clone()
    state["m.scales"][0, 0] *= 2
    with pytest.raises(TreeqError, match="m: its scales are not what its second-level statistics give"):
        to_spqr(state, stats_bits=3, group_size=16)


def test_checkpoint_loads_to_what_the_model_computed(tmp_path, tokenizer, text_file):
    cfg = treeq.QuantConfig(
        method="spqr", bits=3, group_size=16, sym=False, format="spqr", calib_samples=4, seqlen=32, batch_size=4
    )
    log, loaded = quantize_and_load(cfg, tmp_path, tokenizer, text_file)
    assert all(r.extras.startswith("outliers ") for r in log.records)
    layer = loaded.get_submodule("model.layers.0.mlp.down_proj")
    assert layer.fmt.extras == "spqr" and layer.fmt.desc_act
    # Through the kernel selection picks (dense part) plus the sparse addmm: exactly W^T.
    w = layer.effective_weight()
    assert torch.equal(layer(torch.eye(layer.in_features)), w.T)

    info = treeq.inspect_checkpoint(tmp_path / "q")
    assert info.quantization["quant_method"] == "treeq-spqr"  # no GPTQ/AWQ/transformers loader reads it
    assert info.extras["model.layers.0.mlp.down_proj"].startswith("outliers ")
    # Bits per weight from the stored tensors, by hand: 3-bit codes, 3-bit zero points and 3-bit
    # scale codes per 16 weights, fp16 step and minimum per 16 x 16, each input channel's group in 3
    # bits (8 groups), a uint8 outlier count per row, an int16 column and an fp16 value per outlier.
    nnz = layer.extras.nnz
    out, n_in = 64, 128
    bits = 3 * out * n_in + (3 + 3) * out * n_in / 16 + 32 * out * n_in / 256 + 3 * n_in
    bits += 8 * out + (16 + 16) * nnz
    assert info.bits_per_weight["model.layers.0.mlp.down_proj"] == pytest.approx(bits / (out * n_in))


def test_the_format_refuses_other_methods_in_one_line():
    with pytest.raises(ValueError, match="checkpoint_format 'spqr' holds SpQR's results only, not gptq's"):
        treeq.QuantConfig(method="gptq", format="spqr")
    with pytest.raises(ValueError, match="spqr.*grid 'minmax' only"):
        treeq.QuantConfig(method="spqr", grid="half-step")


def test_leave_one_out_gain_is_the_refit_without_each_weight():
    """Against fitting each row's grid to the group with one weight removed, one at a time."""
    from treeq.methods.spqr import _Sweep

    w, x = layer_problem()
    cfg = treeq.QuantConfig(method="spqr", bits=3, group_size=16, sym=False)
    method = SpQR(cfg)
    group, diag = w[:, :16], torch.rand(16) + 0.5
    sweep = _Sweep(method, w.clone(), torch.eye(128), 1.0, 16)

    def error(row: torch.Tensor, d: torch.Tensor) -> float:
        scale, zero = method.grid.raw_params(row[None])
        q = method.grid.fake_quantize(row, scale.clamp(min=2.0**-14), zero)
        return float(((q - row) / d).square().sum())

    def without(t: torch.Tensor, k: int) -> torch.Tensor:
        return torch.cat([t[:k], t[k + 1 :]])

    gains = [[error(r, diag) - error(without(r, k), without(diag, k)) for k in range(16)] for r in group]
    expected = torch.tensor(gains)
    torch.testing.assert_close(sweep.leave_one_out_gain(group, diag), expected, rtol=1e-4, atol=1e-6)


def test_the_cli_quantizes_with_spqr_options_and_inspect_lists_each_modules_outliers(tmp_path, tokenizer, text_file):
    from conftest import save_model_dir
    from test_cli import run

    src = save_model_dir(tmp_path / "src", "llama", tokenizer)
    out = tmp_path / "q"
    r = run(
        "quantize", src, "--calib-text", text_file, "--calib-samples", 4, "--seqlen", 32, "--method", "spqr",
        "--bits", 3, "--group-size", 16, "--asym", "--format", "spqr", "--outlier-threshold", 0.5,
        "--stats-bits", 2, "--out", out, "--threads", 2,
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    qcfg = treeq.inspect_checkpoint(out).quantization
    assert (qcfg["outlier_threshold"], qcfg["stats_bits"], qcfg["stats_group"]) == (0.5, 2, 16)
    r = run("inspect", out, "--modules")
    assert r.exit_code == 0, r.output
    line = next(x for x in r.output.splitlines() if x.startswith("  model.layers.1.mlp.up_proj: "))
    assert " bits per weight, outliers " in line and "scales on a second level per 16 rows" in line


def test_clip_search_fits_clipped_rows_whose_scales_still_are_their_statistics():
    w, x = layer_problem()
    cfg = treeq.QuantConfig(method="spqr", bits=3, group_size=16, sym=False, clip_search=True)
    method = SpQR(cfg)
    stats = method.stats(w.shape[1], torch.device("cpu"))
    stats.add(x)
    clipped, plain = method.quantize(w, stats), quantize(w, x)
    assert torch.equal(clipped.scales, scales_from_statistics(*clipped.extras.statistics()))
    assert not torch.equal(clipped.scales, plain.scales) and clipped.loss < plain.loss
