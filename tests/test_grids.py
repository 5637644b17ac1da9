"""Grid family: each grid's own definition, its checkpoint record, kernel capability, and that the
weight a kernel reconstructs from a saved checkpoint equals the fake-quant weight of calibration."""

import json

import pytest
import torch
from conftest import make_model

import treeq
from treeq.data import calibration_batches
from treeq.engine.looper import quantize_layers
from treeq.engine.plan import MethodPlan
from treeq.engine.quant_log import QuantLog
from treeq.errors import TreeqError
from treeq.kernels import Kernel, LinearFormat, select_kernel
from treeq.models import spec_for
from treeq.numerics import GRIDS, SUPPORTED_BITS, HalfStepGrid, StretchedGrid, make_grid
from treeq.runtime.quant_linear import QuantLinear
from treeq.storage.checkpoint import save_quantized, swap_in_quantized

GRID_BITS = [(g, b) for g in GRIDS for b in SUPPORTED_BITS if b in GRIDS[g].bits_allowed]


def weights(rows=16, cols=64, seed=0):
    # Heavy tails, as LLM weights have, so clipping grids differ from absmax ones.
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * torch.exp(torch.randn(rows, cols, generator=g) * 0.5) * 0.02


def fake_quant(grid, w):
    grid = grid.for_weight(w)  # as methods do: QRazor's grid binds each row's scale here
    w = grid.prepare(w)
    scale, zero = grid.params(w)
    codes = grid.quantize(w, scale[:, None], zero[:, None])
    return codes, scale, grid.dequantize(codes, scale[:, None], zero[:, None])


def signed_levels(codes, bits):
    return codes.long() - 2 ** (bits - 1)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_restricted_grid_never_uses_the_most_negative_code(bits):
    w = weights()
    codes, scale, fq = fake_quant(make_grid("restricted", bits), w)
    c = signed_levels(codes, bits)
    top = 2 ** (bits - 1) - 1
    assert c.min() == -top and c.max() == top
    assert torch.equal(fq, c.float() * scale[:, None])
    assert torch.equal(scale, (w.abs().amax(1) / top).half().float())


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_signed_grid_uses_the_full_range_with_scale_from_absmax(bits):
    w = weights()
    codes, scale, fq = fake_quant(make_grid("signed", bits), w)
    c = signed_levels(codes, bits)
    assert c.min() == -(2 ** (bits - 1)) and c.max() <= 2 ** (bits - 1) - 1
    assert torch.equal(scale, (w.abs().amax(1) / 2 ** (bits - 1)).half().float())


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_half_step_levels_are_odd_half_steps_with_no_zero(bits):
    w = weights()
    codes, scale, fq = fake_quant(make_grid("half-step", bits), w)
    steps = fq / scale[:, None]
    assert torch.equal(steps, signed_levels(codes, bits).float() + 0.5)
    assert (steps != 0).all() and steps.abs().max() <= 2 ** (bits - 1) - 0.5


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_stretched_grid_is_parqs_formula(bits):
    w = weights()
    _, scale, fq = fake_quant(make_grid("stretched", bits), w)
    # The definition, written out independently of the grid classes.
    a = w.abs()
    q_max = torch.minimum(bits * a.mean(1, keepdim=True), a.amax(1, keepdim=True))
    s = (q_max / (2 ** (bits - 1) - 0.5)).half().float()
    expected = (torch.round(torch.clamp(w, -q_max, q_max) / s - 0.5) + 0.5) * s
    assert torch.equal(scale[:, None], s)
    assert torch.equal(fq, expected)


@pytest.mark.parametrize("grid_name", ["half-step", "stretched"])
@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_lut_form_reproduces_the_dequantized_weight(grid_name, bits):
    grid = make_grid(grid_name, bits)
    codes, scale, fq = fake_quant(grid, weights())
    table, table_scale = grid.lut()
    assert table.dtype == torch.int32 and len(table) == 2**bits
    assert torch.equal(table[codes.long()].float() * (table_scale * scale[:, None]), fq)


def test_two_bit_lut_is_the_odd_integers():
    assert StretchedGrid(2).lut()[0].tolist() == [-3, -1, 1, 3]
    assert HalfStepGrid(3).lut()[0].tolist() == [-7, -5, -3, -1, 1, 3, 5, 7]


def test_fp8_int4_is_fbgemms_two_stage():
    w = weights(cols=128)
    _, scale, fq = fake_quant(make_grid("fp8-int4", 4), w)
    row_scale = w.abs().amax(1, keepdim=True) / 448
    w8 = (w / row_scale).to(torch.float8_e4m3fn).float() * row_scale
    s = (w8.abs().amax(1, keepdim=True).clamp(min=1e-6) / 8).half().float()
    assert not torch.equal(w8, w)  # the fp8 stage really rounds
    assert torch.equal(fq, torch.clamp(torch.round(w8 / s), -8, 7) * s)


def test_clip_search_lowers_the_weight_error_without_raising_it_anywhere():
    w = weights(rows=64)
    for name in ("restricted", "half-step"):
        plain = (w - fake_quant(make_grid(name, 3), w)[2]).abs().pow(2.4).sum(1)
        searched = (w - fake_quant(make_grid(name, 3, clip_search=True), w)[2]).abs().pow(2.4).sum(1)
        assert (searched <= plain).all() and searched.sum() < plain.sum()


@pytest.mark.parametrize("grid,bits", GRID_BITS)
def test_zero_rows_are_coded_exactly(grid, bits):
    g = make_grid(grid, bits)
    w = torch.zeros(2, 8)
    fq = fake_quant(g, w)[2]
    if g.offset:
        assert (fq.abs() <= 0.5).all()  # no zero level; the nearest level of scale 1 is ±0.5
    else:
        assert torch.equal(fq, w)


def test_config_rejects_grids_that_do_not_fit():
    with pytest.raises(TreeqError, match="grid: Input should be 'minmax', 'restricted'"):
        treeq.QuantConfig.build(grid="nf4")
    with pytest.raises(TreeqError, match="grid 'fp8-int4' needs bits in \\[4\\]"):
        treeq.QuantConfig.build(grid="fp8-int4", bits=3)
    with pytest.raises(TreeqError, match="sym=False .* only applies to grid 'minmax'"):
        treeq.QuantConfig.build(grid="stretched", sym=False)


class PlainGPTQKernel(Kernel):
    name = "plain"
    priority = 10

    @staticmethod
    def forward(layer, x):
        raise AssertionError("never run in these tests")


def test_kernels_refuse_offset_grids_unless_they_declare_them():
    fmt = LinearFormat(4, 64, True, False, 128, 64, grid="half-step")
    assert PlainGPTQKernel.rejects(fmt, "cpu", torch.float32) == (
        "grid 'half-step' not supported (runs fp8-int4, minmax, qrazor, restricted, signed)"
    )
    signed = LinearFormat(4, 64, True, False, 128, 64, grid="signed")
    assert PlainGPTQKernel.rejects(signed, "cpu", torch.float32) is None
    assert select_kernel(fmt, "cpu", torch.float32).name == "torch"


def quantize_and_save(tmp_path, tokenizer, text_file, **settings):
    cfg = treeq.QuantConfig(group_size=32, calib_samples=4, seqlen=32, batch_size=4, **settings)
    model = make_model("llama", num_hidden_layers=1)
    c = cfg.calibration
    batches = calibration_batches(tokenizer, text_file.read_text(), c.calib_samples, c.seqlen, c.batch_size)
    results = quantize_layers(model, spec_for(model.config), MethodPlan(cfg), batches, torch.device("cpu"))
    fake = {name: model.get_submodule(name).weight.detach().clone() for name in results}
    swap_in_quantized(model, results, cfg)
    save_quantized(model, tokenizer, cfg, results, tmp_path / "q", QuantLog())
    return fake


@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("grid,bits", GRID_BITS)
def test_kernel_output_from_the_checkpoint_equals_calibration_fake_quant(
    grid, bits, method, tmp_path, tokenizer, text_file
):
    fake = quantize_and_save(tmp_path, tokenizer, text_file, method=method, grid=grid, bits=bits)
    qcfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qcfg["grid"] == grid and qcfg["grid_offset"] == GRIDS[grid].offset
    loaded, _ = treeq.load(tmp_path / "q")
    for name, w in fake.items():
        layer = loaded.get_submodule(name)
        assert isinstance(layer, QuantLinear) and layer.fmt.grid == grid
        assert torch.equal(layer.dequantized_weight(), w), name
        # Through the selected kernel: an identity input returns W^T exactly.
        eye = torch.eye(layer.in_features)
        out = layer(eye) - (0 if layer.bias is None else layer.bias)
        assert torch.equal(out, w.T), name


def test_stretched_checkpoint_records_its_lut(tmp_path, tokenizer, text_file):
    quantize_and_save(tmp_path, tokenizer, text_file, method="rtn", grid="stretched", bits=2)
    qcfg = json.loads((tmp_path / "q" / "quantize_config.json").read_text())
    assert qcfg["lut"] == {"table": [-3, -1, 1, 3], "table_scale": 0.5}
    assert qcfg["meta"]["settings"]["weights"]["grid"] == "stretched"


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("grid", "nf4", "unknown grid 'nf4' in quantization_config"),
        ("grid_offset", 0.25, "grid 'half-step' has offset 0.5, but quantization_config records 0.25"),
    ],
)
def test_a_grid_this_treeq_cannot_rebuild_is_a_clear_error(key, value, message, tmp_path, tokenizer, text_file):
    quantize_and_save(tmp_path, tokenizer, text_file, method="rtn", grid="half-step", bits=4)
    cfg_file = tmp_path / "q" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["quantization_config"][key] = value
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(TreeqError, match=message):
        treeq.load(tmp_path / "q")


def test_cli_quantizes_with_a_grid_and_inspect_names_it(model_dir, text_file, tmp_path):
    from test_cli import one_line_error, quantize_args, run

    out = tmp_path / "q"
    r = run(*quantize_args(model_dir, text_file, out, "--method", "rtn", "--bits", 2, "--grid", "stretched"))
    assert r.exit_code == 0, r.output
    r = run("inspect", out)
    assert r.exit_code == 0, r.output
    assert "grid: stretched" in r.output and "kernel on cpu/float32: torch for 14 modules" in r.output
    assert "kernel on cpu/bfloat16: torch for 14 modules" in r.output  # cpu_int4 cannot run a half-step grid
    bad = run(*quantize_args(model_dir, text_file, tmp_path / "bad", "--grid", "fp8-int4", "--bits", 2))
    one_line_error(bad, "grid 'fp8-int4' needs bits in [4]")


@pytest.mark.parametrize("grid", list(GRIDS))
def test_gptq_beats_rtn_on_every_grid(grid):
    from test_methods import correlated_inputs, quantize

    x, w = correlated_inputs(), torch.randn(64, 128)
    bits = 3 if 3 in GRIDS[grid].bits_allowed else 4
    rtn = quantize("rtn", w, x, bits=bits, group_size=32, grid=grid)
    gptq = quantize("gptq", w, x, bits=bits, group_size=32, grid=grid)
    assert rtn.grid == gptq.grid == grid
    assert gptq.loss < rtn.loss


def test_coarse_to_fine_clip_search_matches_an_exhaustive_one():
    """32 tries (coarse 0.04 steps, then 0.008 around each row's best) lose almost nothing against
    GPTQ's 100-step exhaustive search over the same range."""
    from treeq.numerics import _storable

    g, w = make_grid("minmax", 4, clip_search=True), weights(rows=256)
    errors = []
    for ratio in torch.linspace(1.0, 0.2, 100):
        s, z = g.raw_params(w * ratio)
        s = _storable(s)
        errors.append((w - g.fake_quantize(w, s[:, None], z[:, None])).abs().pow(2.4).sum(1))
    exhaustive = torch.stack(errors).min(0).values
    searched = (w - fake_quant(g, w)[2]).abs().pow(2.4).sum(1)
    assert searched.sum() <= 1.01 * exhaustive.sum()
    assert (searched <= 1.05 * exhaustive).float().mean() > 0.95
