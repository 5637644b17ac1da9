"""QRazor's significant-data razoring: the grid against a by-hand integer reference, its compact
checkpoint format as an exact relayout (fp16 range edges included), and save -> load -> run."""

import pydantic
import pytest
import torch
from conftest import make_model
from test_combinations import quantized_and_loaded, recorded_fake_quant

import treeq
from treeq.config import QuantConfig
from treeq.errors import TreeqError
from treeq.formats.qrazor import from_qrazor, shifts_of, to_qrazor
from treeq.methods import METHODS
from treeq.numerics import QRazorGrid, fake_quantize_razored_activation, make_grid, razor_round, razor_shift
from treeq.runtime.kv_cache import QuantizedKVLayer
from treeq.runtime.kv_schemes import cache_nbytes, kv_cache_for
from treeq.runtime.qrazor_kv import QRazorKV
from treeq.runtime.quant_linear import QuantLinear
from treeq.schemes import ActivationScheme, KVCacheScheme
from treeq.storage.inspect import inspect_checkpoint


def test_razor_keeps_the_bits_from_the_leading_one_and_rounds_ties_away():
    amax = torch.tensor([0.0, 1.0, 7.0, 8.0, 15.0, 16.0, 127.0, 300.0])
    assert razor_shift(amax, 3, 4).tolist() == [0, 0, 0, 1, 1, 2, 4, 4]
    assert razor_round(torch.tensor([2.5, -2.5, 3.49, 7.6, -9.0, -0.4]), 3).tolist() == [3, -3, 3, 7, -7, 0]


def reference_qrazor(w: torch.Tensor, group: int, bits: int = 4) -> torch.Tensor:
    """QRazor with Python integers: 8-bit absmax per row, then per group the leading one's bit
    position, the (bits - 1) bits from it kept by adding half the dropped part and shifting."""
    keep = bits - 1
    out = torch.empty_like(w)
    for i, row in enumerate(w.tolist()):
        r = float(torch.tensor(max(abs(v) for v in row) / 127).half())
        q = [max(-127, min(127, round(v / r))) for v in row]  # Python's round: ties to even, as torch's
        for g in range(0, len(q), group):
            part = q[g : g + group]
            shift = max(0, max(abs(v) for v in part).bit_length() - keep)
            for j, v in enumerate(part):
                mag = (abs(v) + (1 << shift >> 1)) >> shift
                out[i, g + j] = (1 if v >= 0 else -1) * min(mag, 2**keep - 1) * 2**shift * r
    return out


def quantized(weight: torch.Tensor, method: str = "rtn", **settings):
    cfg = QuantConfig(method=method, grid="qrazor", **settings)
    m = METHODS[method](cfg)
    return m.round(weight) if method == "rtn" else m.quantize(weight, stats(weight.shape[1]))


def stats(n_in: int):
    s = METHODS["gptq"](QuantConfig(grid="qrazor")).stats(n_in, torch.device("cpu"))
    s.add(torch.randn(256, n_in, generator=torch.Generator().manual_seed(1)))
    return s


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group", [8, 16, 32])
def test_rtn_equals_the_integer_reference(bits, group):
    w = torch.randn(12, 64, generator=torch.Generator().manual_seed(bits * group)) * 0.05
    w[3, 5:9] *= 40  # an outlier group: its neighbours keep their own, smaller shifts
    w[7, :16] = 0  # all-zero groups
    result = quantized(w, bits=bits, group_size=group)
    assert torch.equal(result.weight(), reference_qrazor(w, group, bits))


def test_group_scales_are_the_row_scale_times_powers_of_two():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    for result in (quantized(w, group_size=8), quantized(w, "gptq", group_size=8)):
        shift, row = shifts_of(result.scales)
        assert torch.equal(row.float()[None] * torch.exp2(shift.float()), result.scales.float())
        assert int(shift.max()) <= 2**QRazorGrid.SHIFT_BITS - 1
        assert bool((result.zeros == 8).all())


def test_the_grid_refuses_to_quantize_without_row_scales():
    with pytest.raises(ValueError, match="for_weight"):
        make_grid("qrazor", 4).params(torch.randn(4, 8))


def test_clip_search_moves_a_shift_by_one_only_where_the_weight_error_drops():
    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(3))
    w[:8, 0] = 10.0
    w[:8, 8:16] = 10.0 * 124 / 127  # 124 / 2^4 rounds to 8 and would saturate at 7: one shift up is closer
    grid = make_grid("qrazor", 4).for_weight(w)
    searched = make_grid("qrazor", 4, clip_search=True).for_weight(w)
    w8 = grid.prepare(w)[:, 8:16]  # groups without their row's largest weight
    (s0, z), (s1, _) = grid.params(w8), searched.params(w8)

    def error(s):
        return (w8 - grid.fake_quantize(w8, s[:, None], z[:, None])).abs().pow(2.4).sum(dim=1)

    moved = s1 != s0
    assert bool((s1 < s0).any() and (s1 > s0).any())
    assert bool(((s1[moved] == s0[moved] / 2) | (s1[moved] == s0[moved] * 2)).all())
    assert bool((error(s1)[moved] < error(s0)[moved]).all())


def test_gptq_beats_rtn_on_the_layer_output():
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(5))
    h = stats(64).h
    errors = []
    for method in ("rtn", "gptq"):
        d = w - quantized(w, method, group_size=8, clip_search=False).weight()
        errors.append(float(((d @ h) * d).sum()))
    assert errors[1] < errors[0]


def gptq_layout(scales: torch.Tensor, bits: int = 4) -> dict[str, torch.Tensor]:
    from treeq import packing

    groups, out = scales.shape
    codes = torch.randint(1, 2**bits, (groups * 8, out), generator=torch.Generator().manual_seed(0))
    zeros = torch.full((groups, out), 2 ** (bits - 1))
    return {
        "m.qweight": packing.pack(codes, bits),
        "m.qzeros": packing.pack(zeros.T.contiguous(), bits).T.contiguous(),
        "m.scales": scales.half(),
        "m.g_idx": torch.arange(groups * 8, dtype=torch.int32) // 8,
    }


@pytest.mark.parametrize(
    "amax",
    [1e-7, 1e-5, 0.03, 100.0, 60000.0],  # fp16-subnormal row scales, ordinary ones, and scales near fp16's top
)
def test_the_compact_layout_converts_exactly_both_ways(amax):
    w = torch.randn(64, 32, generator=torch.Generator().manual_seed(2)) * amax / 3
    w[0] = 0  # a zero row: scale 1
    w[1, 8:16] = 0  # a zero group: the row's own scale
    result = quantized(w, group_size=8)
    tensors = {
        "m.qweight": treeq.packing.pack(result.codes.T.contiguous(), 4),
        "m.qzeros": treeq.packing.pack(result.zeros.T.contiguous(), 4).T.contiguous(),
        "m.scales": result.scales,
        "m.g_idx": result.g_idx,
    }
    stored = to_qrazor(tensors, lambda name: 4)
    assert set(stored) == {"m.qweight", "m.shifts", "m.row_scale", "m.g_idx"}
    assert stored["m.row_scale"].dtype == torch.float16 and bool(torch.isfinite(result.scales).all())
    back = from_qrazor(stored, {"group_size": 8}, lambda name: 4)
    assert set(back) == set(tensors)
    for key, value in tensors.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key


def test_shifts_stay_below_fp16s_maximum_where_gptq_grows_a_weight():
    grid = make_grid("qrazor", 4).for_weight(torch.full((1, 8), 65504.0))
    scale, _ = grid.params(torch.full((1, 8), 65504.0 * 8))  # 8x the row's absmax after error feedback
    assert bool(torch.isfinite(scale.half()).all()) and float(scale) * 2 > 65504


def test_layouts_that_are_not_qrazor_are_refused():
    scales = torch.tensor([[1.0, 2.0], [4.0, 3.0]]).repeat(1, 4)  # 3 / 2 is no power of two
    with pytest.raises(TreeqError, match="powers of two"):
        to_qrazor(gptq_layout(scales), lambda name: 4)
    wide = torch.tensor([[1.0], [256.0]]).repeat(1, 8)  # 2^8: more than 3 shift bits hold
    with pytest.raises(TreeqError, match="powers of two"):
        to_qrazor(gptq_layout(wide), lambda name: 4)
    tensors = gptq_layout(torch.ones(2, 8))
    tensors["m.qzeros"] = treeq.packing.pack(torch.full((2, 8), 7).T.contiguous(), 4).T.contiguous()
    with pytest.raises(TreeqError, match="zero points"):
        to_qrazor(tensors, lambda name: 4)


def test_the_config_refuses_other_grids_in_the_qrazor_format():
    with pytest.raises(TreeqError, match="qrazor grid only, not minmax"):
        QuantConfig.build(method="rtn", grid="minmax", format="qrazor")
    with pytest.raises(TreeqError, match="one bits and group_size"):
        QuantConfig.build(method="rtn", grid="qrazor", format="qrazor", overrides=[{"pattern": "x", "bits": 2}])


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_saved_compact_checkpoint_loads_to_the_fake_quant_weight(method, tmp_path, tokenizer, text_file, monkeypatch):
    fake = recorded_fake_quant(monkeypatch)
    cfg = QuantConfig(
        method=method, grid="qrazor", group_size=8, format="qrazor", calib_samples=4, seqlen=32, batch_size=4
    )
    loaded = quantized_and_loaded(cfg, tmp_path / "q", tokenizer, text_file)
    assert len(fake) == 7
    for name, w in fake.items():
        layer = loaded.get_submodule(name)
        assert isinstance(layer, QuantLinear) and layer.fmt.grid == "qrazor"
        assert torch.equal(layer.effective_weight(), w), name
        out = layer(torch.eye(layer.in_features)) - (0 if layer.bias is None else layer.bias)
        assert torch.equal(out, w.T), name
    # bits per weight as inspect counts them: 4-bit codes, 3-bit shifts packed 32 to 3 int32 words
    # (padded to whole runs), an fp16 scale per row, an int32 group index per input channel
    info = inspect_checkpoint(tmp_path / "q")
    for name in fake:
        f = info.formats[name]
        shift_words = 3 * -(-(f.in_features // 8) * f.out_features // 32)
        stored = 4 * f.in_features * f.out_features + 32 * shift_words + 16 * f.out_features + 32 * f.in_features
        assert info.bits_per_weight[name] == stored / (f.in_features * f.out_features), name


def reference_razored_rows(x: torch.Tensor, bits: int, group: int, base_bits: int, scale_dtype) -> torch.Tensor:
    """QRazor on each row of x [..., K] with Python integers: base_bits absmax integers (scale
    rounded to scale_dtype), per group the (bits - 1) bits from the leading one, rounded by adding
    half the dropped part."""
    keep, base_max = bits - 1, 2 ** (base_bits - 1) - 1
    rows = x.reshape(-1, x.shape[-1])
    out = torch.empty_like(rows)
    for i, row in enumerate(rows.tolist()):
        r = float((torch.tensor(max(abs(v) for v in row)) / base_max).to(scale_dtype)) or 1.0  # zero row: 1
        q = [round(float(torch.tensor(v) / r)) for v in row]
        for g in range(0, len(q), group):
            part = q[g : g + group]
            shift = max(0, max(abs(v) for v in part).bit_length() - keep)
            for j, v in enumerate(part):
                mag = min((abs(v) + (1 << shift >> 1)) >> shift, 2**keep - 1)
                out[i, g + j] = float(torch.tensor((1 if v >= 0 else -1) * mag * 2**shift, dtype=torch.float32) * r)
    return out.reshape(x.shape)


@pytest.mark.parametrize("bits,group", [(4, 8), (4, 32), (8, 16)])
def test_razored_activations_equal_the_integer_reference(bits, group):
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(bits + group))
    x[2, 10] = 40.0  # an outlier channel: other groups of its token keep their resolution
    x[4] = 0
    fake = fake_quantize_razored_activation(x, bits, group)
    assert torch.equal(fake, reference_razored_rows(x, bits, group, 16, torch.float32))
    assert fake_quantize_razored_activation(x.bfloat16(), bits, group).dtype == torch.bfloat16


def test_razored_activation_scheme_needs_dynamic_symmetric_groups():
    with pytest.raises(pydantic.ValidationError, match="granularity 'per-group'"):
        ActivationScheme(bits=4, grid="qrazor")
    ActivationScheme(bits=4, grid="qrazor", granularity="per-group", group_size=16)


def test_razored_activations_are_recorded_and_applied_after_loading(tmp_path, tokenizer, text_file):
    act = dict(bits=4, granularity="per-group", group_size=8, grid="qrazor")
    cfg = QuantConfig(
        method="rtn", grid="qrazor", group_size=8, format="qrazor", activations=act, calib_samples=4, seqlen=32
    )
    loaded = quantized_and_loaded(cfg, tmp_path / "q", tokenizer, text_file)
    layer = loaded.get_submodule("model.layers.0.mlp.down_proj")
    x = torch.randn(3, layer.in_features)
    expected = torch.nn.functional.linear(fake_quantize_razored_activation(x, 4, 8), layer.effective_weight())
    assert layer.fmt.activation == ActivationScheme(**act)
    torch.testing.assert_close(layer(x), expected + (0 if layer.bias is None else layer.bias), rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits,group", [(4, 16), (4, 32), (3, 8)])
def test_the_kv_quantizer_decodes_the_integer_reference(bits, group):
    x = torch.randn(2, 3, 5, 32, generator=torch.Generator().manual_seed(group)) * 3
    x[0, 1, 2] = 0
    kv = QRazorKV(bits, group, 32)
    stored = kv.encode(x.bfloat16())
    assert torch.equal(kv.decode(stored).float(), reference_razored_rows(x.bfloat16(), bits, group, 8, torch.float16))
    assert kv.decode(stored).dtype == torch.bfloat16
    # codes, one byte per group's shift, fp16 per token
    assert stored.nbytes == x.numel() * bits // 8 + x.numel() // group + x[..., 0].numel() * 2


def test_a_cache_of_razored_blocks_returns_decoded_keys_then_the_fp_window():
    layer = QuantizedKVLayer(QRazorKV(4, 16, 32), QRazorKV(4, 16, 32), residual=3)
    first, second = torch.randn(1, 2, 6, 32), torch.randn(1, 2, 4, 32)
    layer.update(first, first)
    keys, _ = layer.update(second, second)
    both = torch.cat([first, second], dim=-2)
    assert layer.stored_tokens == 7
    assert torch.equal(keys[..., :7, :], reference_razored_rows(both[..., :7, :], 4, 16, 8, torch.float16))
    assert torch.equal(keys[..., 7:, :], both[..., 7:, :])
    with pytest.raises(TreeqError, match="divisor of 32"):
        QRazorKV(4, 12, 32)


def test_the_qrazor_kv_preset_builds_razored_layers_and_shrinks_the_cache():
    model = make_model("llama", head_dim=32, hidden_size=128)
    ids = torch.randint(0, 256, (1, 200), generator=torch.Generator().manual_seed(0))
    sizes = {}
    for name in ("fp", "qrazor-4"):
        cache = kv_cache_for(model, name)
        model(input_ids=ids, cache=cache, use_cache=True)
        sizes[name] = cache_nbytes(cache)
    assert isinstance(cache.layers[0].key_quantizer, QRazorKV) and cache.layers[0].stored_tokens == 200 - 128
    assert sizes["qrazor-4"] < sizes["fp"]
    with pytest.raises(pydantic.ValidationError, match="per-token"):
        KVCacheScheme(method="qrazor")
    with pytest.raises(pydantic.ValidationError, match="key_bits and value_bits in"):
        KVCacheScheme(method="qrazor", key_granularity="per-token", key_bits=8)


def test_compare_rows_on_the_qrazor_grid(model_dir, text_file, tmp_path):
    from test_cli import run

    out = tmp_path / "cmp"
    r = run(
        "compare", str(model_dir), "--methods", "rtn,gptq", "--bits", "4", "--grid", "qrazor", "--group-size", "8",
        "--calib-samples", "4", "--seqlen", "32", "--calib-text", str(text_file), "--eval-text", str(text_file),
        "--eval-seqlen", "32", "--eval-windows", "2", "--out", str(out),
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    rows = (out / "compare.md").read_text()
    assert "| rtn-qrazor | 4 | 16 | 8 |" in rows and "| gptq-qrazor | 4 | 16 | 8 |" in rows
    assert treeq.inspect_checkpoint(out / "rtn-qrazor-w4a16g8").formats["model.layers.0.mlp.up_proj"].grid == "qrazor"
