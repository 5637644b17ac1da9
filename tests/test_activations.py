"""Activation quantization for every method: the fake-quant numerics, calibration that sees the
quantized inputs of earlier subsets, checkpoints that load with the same input quantizers, LLM.int8()'s
outlier columns, and SmoothQuant's scales."""

import csv

import pytest
import torch
from conftest import save_model_dir
from test_path_equivalence import tensors

import treeq
from treeq.engine.quant_log import QuantLog
from treeq.errors import TreeqError
from treeq.methods import InputStats
from treeq.numerics import fake_quantize_activation
from treeq.runtime.activations import FakeQuantActivation
from treeq.runtime.quant_linear import QuantLinear
from treeq.schemes import ActivationScheme
from treeq.transforms import TRANSFORMS

CALIB = dict(bits=8, group_size=-1, calib_samples=8, seqlen=64, batch_size=4)


def quantize(src, out, text_file, **settings):
    cfg = treeq.QuantConfig(**{**CALIB, **settings})
    return treeq.quantize(str(src), cfg, out, calib_text=str(text_file), log=QuantLog(str))


def test_per_group_inputs_are_per_token_quantized_groups():
    x = torch.randn(3, 5, 64)
    q = FakeQuantActivation(ActivationScheme(bits=4, granularity="per-group", group_size=16), 64)(x)
    expected = fake_quantize_activation(x.reshape(3, 5, 4, 16), 4, True, True).reshape(3, 5, 64)
    assert torch.equal(q, expected)
    assert not torch.equal(q, fake_quantize_activation(x, 4, True, True))


def test_outlier_columns_pass_in_full_precision_and_leave_the_rest_finer():
    """LLM.int8(): a column above the threshold in any token is kept exactly; the other columns are
    quantized on scales computed without it. Checked failing with the outliers left in the scale."""
    x = torch.randn(6, 32) * 0.5
    x[2, 7] = 40.0  # one token's outlier makes column 7 an outlier column for every token
    quantizer = FakeQuantActivation(ActivationScheme(bits=8, outlier_threshold=6.0), 32)
    q = quantizer(x)
    assert torch.equal(q[:, 7], x[:, 7])
    rest = torch.cat([x[:, :7], x[:, 8:]], dim=1)
    expected = fake_quantize_activation(x.masked_fill(torch.arange(32) == 7, 0), 8)
    assert torch.equal(torch.cat([q[:, :7], q[:, 8:]], dim=1), torch.cat([expected[:, :7], expected[:, 8:]], dim=1))
    plain = fake_quantize_activation(x, 8)
    assert (q - x).abs().sum() < (torch.cat([plain[:, :7], plain[:, 8:]], 1) - rest).abs().sum()
    assert quantizer.outlier_share == pytest.approx(1 / 32)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_w8a8_checkpoint_loads_with_the_same_input_quantizers(method, tmp_path, tokenizer, text_file):
    src = save_model_dir(tmp_path / "src", "llama", tokenizer)
    act = dict(bits=8, granularity="per-token")
    report = quantize(src, tmp_path / "q", text_file, method=method, activations=act)
    weight_only = quantize(src, tmp_path / "w", text_file, method=method)
    loaded, _ = treeq.load(tmp_path / "q")
    layers = [m for m in loaded.modules() if isinstance(m, QuantLinear)]
    assert layers and all(isinstance(m.input_quantizer, FakeQuantActivation) for m in layers)
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, report.model(ids).logits, rtol=0, atol=1e-5)
        assert not torch.allclose(report.model(ids).logits, weight_only.model(ids).logits, rtol=0, atol=1e-6)


def test_later_layers_calibrate_on_quantized_activations(tmp_path, tokenizer, text_file):
    """With 4-bit activations, GPTQ's second layer sees other inputs than without, so its codes
    differ, while the first layer's first subset (fed by the embeddings) is the same. Checked
    failing with the looper not hooking the quantizers in."""
    src = save_model_dir(tmp_path / "src", "llama", tokenizer)
    quantize(src, tmp_path / "a4", text_file, method="gptq", bits=4, group_size=32, activations=dict(bits=4))
    quantize(src, tmp_path / "a16", text_file, method="gptq", bits=4, group_size=32)
    a, b = tensors(tmp_path / "a4"), tensors(tmp_path / "a16")
    assert torch.equal(a["model.layers.0.self_attn.q_proj.qweight"], b["model.layers.0.self_attn.q_proj.qweight"])
    assert not torch.equal(a["model.layers.1.self_attn.q_proj.qweight"], b["model.layers.1.self_attn.q_proj.qweight"])


def test_smoothquant_at_half_strength_gives_inputs_and_weights_the_same_ranges():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=gen)
    x[:, :3] *= 50
    stats = InputStats(64, torch.device("cpu"))
    stats.add(x)
    weights = [torch.randn(32, 64, generator=gen), torch.randn(16, 64, generator=gen)]
    s = TRANSFORMS["smoothquant"]({"alpha": 0.5}).scales(weights, stats, lambda w: w)
    x_range = (x / s).abs().amax(dim=0)
    w_range = torch.cat([w * s for w in weights]).abs().amax(dim=0)
    torch.testing.assert_close(x_range, w_range, rtol=1e-5, atol=0)


def test_smoothquant_w8a8_folds_and_round_trips(tmp_path, tokenizer, text_file):
    src = save_model_dir(tmp_path / "src", "llama", tokenizer)
    report = quantize(src, tmp_path / "q", text_file, method="rtn", migration="smoothquant", alpha=0.8, activations={})
    loaded, _ = treeq.load(tmp_path / "q")
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, report.model(ids).logits, rtol=0, atol=1e-5)
    assert report.model.model.layers[0].self_attn.q_proj.input_quantizer is not None


def test_static_levels_come_from_the_calibrated_range_and_clamp_beyond_it():
    """Per group: sym scale = amax / qmax; asym scale and zero from [min, max] (which holds 0);
    with an outlier threshold the levels reach only the threshold (beyond it columns pass in fp)."""
    low, high = torch.tensor([-1.0, -0.5, 0.0, -3.0]), torch.tensor([2.0, 0.5, 4.0, 1.0])
    sym = FakeQuantActivation(ActivationScheme(bits=8, granularity="per-group", group_size=2, dynamic=False), 4)
    sym.calibrate(low, high)
    torch.testing.assert_close(sym.scale, torch.tensor([2.0, 4.0]) / 127)
    asym = FakeQuantActivation(ActivationScheme(bits=4, granularity="per-tensor", sym=False, dynamic=False), 4)
    asym.calibrate(low, high)
    torch.testing.assert_close(asym.scale, torch.tensor([7.0 / 15]))
    assert asym.zero.tolist() == [round(3.0 / (7.0 / 15))]
    x = torch.tensor([[-3.0, 0.0, 4.0, 100.0]])
    assert asym(x)[0, -1] == (15 - asym.zero[0]) * asym.scale[0]  # clamped to the top level
    clipped = FakeQuantActivation(
        ActivationScheme(bits=8, granularity="per-tensor", dynamic=False, outlier_threshold=2.5), 4
    )
    clipped.calibrate(low, high)
    torch.testing.assert_close(clipped.scale, torch.tensor([2.5 / 127]))


@pytest.mark.parametrize("granularity", [dict(granularity="per-tensor"), dict(granularity="per-group", group_size=32)])
def test_static_w8a8_checkpoint_keeps_the_calibrated_levels(granularity, tmp_path, tokenizer, text_file):
    """The levels calibrated while quantizing are saved with each layer and loaded back: the
    loaded model computes what the one in memory did. Checked failing with the levels left at their
    initial scale 1 (the loader then computes other logits)."""
    src = save_model_dir(tmp_path / "src", "llama", tokenizer)
    act = dict(bits=8, dynamic=False, **granularity)
    report = quantize(src, tmp_path / "q", text_file, method="gptq", activations=act)
    loaded, _ = treeq.load(tmp_path / "q")
    q_proj = loaded.model.layers[1].self_attn.q_proj
    memory = report.model.model.layers[1].self_attn.q_proj.input_quantizer
    assert torch.equal(q_proj.input_quantizer.scale, memory.scale)
    assert bool((memory.scale != 1).all()) and "static" in repr(q_proj)
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, report.model(ids).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(activations=dict(dynamic=False)), "cannot be per-token; use per-tensor or per-group"),
        (dict(activations=dict(bits=5)), "bits"),
        (dict(activations={}, format="compressed-tensors", bits=8), "int8 per-channel symmetric weights"),
        (dict(migration="smoothquant", alpha=1.5), "migration_options.alpha"),
        (dict(alpha=0.5), "alpha is a setting of migration smoothquant"),
    ],
)
def test_bad_activation_settings_are_one_line_errors(settings, message):
    with pytest.raises(TreeqError, match=message):
        treeq.QuantConfig.build(method="rtn", **settings)


def test_cli_quantizes_w8a8_and_inspect_names_the_input_scheme_and_kernel(model_dir, text_file, tmp_path):
    from test_cli import run

    out = tmp_path / "q"
    r = run(
        "quantize", str(model_dir), "--method", "rtn", "--migration", "smoothquant", "--alpha", "0.8",
        "--bits", "8", "--group-size", "-1", "--act-bits", "8", "--act-outlier-threshold", "6",
        "--calib-text", str(text_file), "--calib-samples", "4", "--seqlen", "32", "--out", str(out),
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    settings = treeq.inspect_checkpoint(out).quantization["meta"]["settings"]
    assert settings["migration"] == "smoothquant" and settings["migration_options"] == {"alpha": 0.8}
    r = run("inspect", str(out))
    assert "8-bit per-row sym minmax with inputs 8-bit per-token sym dynamic, fp columns above 6.0" in r.output
    card = (out / "README.md").read_text()
    assert '| scale migration | smoothquant {"alpha": 0.8} |' in card
    assert "| inputs (activations) | 8-bit per-token sym dynamic, fp columns above 6.0 |" in card
    # GPTQ's config cannot say the inputs are quantized: GPTQ loaders must refuse it, not run W8A16.
    assert settings and treeq.inspect_checkpoint(out).quantization["quant_method"] == "treeq"
    assert "vllm serve" not in card


def test_compare_puts_weight_activation_rows_beside_weight_only_ones(model_dir, text_file, tmp_path):
    from test_cli import run

    out = tmp_path / "cmp"
    r = run(
        "compare", str(model_dir), "--methods", "rtn", "--bits", "8", "--act-bits", "16,8,4",
        "--migration", "smoothquant", "--group-size", "32", "--calib-samples", "4", "--seqlen", "32",
        "--calib-text", str(text_file), "--eval-text", str(text_file), "--eval-seqlen", "32",
        "--eval-windows", "3", "--out", str(out),
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    with open(out / "compare.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(x["method"], x["bits"], x["act_bits"]) for x in rows] == [
        ("fp", "16", "16"),
        ("smoothquant+rtn", "8", "16"),
        ("smoothquant+rtn", "8", "8"),
        ("smoothquant+rtn", "8", "4"),
    ]
    ppl = [float(x["ppl"]) for x in rows]
    # Each row evaluated its own model (a random tiny model: no order). Three windows, not two: on an
    # Intel Xeon with AMX the W8A16 row's two window losses moved by the same amount in opposite
    # directions, so its perplexity equalled the fp row's to the last bit.
    assert len(set(ppl)) == 4
    recorded = treeq.inspect_checkpoint(out / "smoothquant+rtn-w8a4g32").quantization["meta"]["settings"]
    assert recorded["activations"]["bits"] == 4 and recorded["migration"] == "smoothquant"


def test_the_quantize_table_gives_each_modules_share_of_fp_input_columns(tmp_path, tokenizer, text_file):
    """Every input column exceeds a threshold near 0 somewhere, none exceeds a huge one; weight-only
    runs leave the column empty."""
    src = save_model_dir(tmp_path / "src", "llama", tokenizer)
    shares = {}
    for name, act in (("low", dict(outlier_threshold=1e-6)), ("high", dict(outlier_threshold=1e6)), ("none", None)):
        report = quantize(src, tmp_path / name, text_file, method="rtn", activations=act)
        shares[name] = [r.fp_input_share for r in report.log.records]
        with open(tmp_path / name / "quant_log.csv") as f:
            assert [row["fp_input_share"] for row in csv.DictReader(f)] == [
                "" if s is None else str(s) for s in shares[name]
            ]
    assert shares["low"] and all(s == 1.0 for s in shares["low"])
    assert all(s == 0.0 for s in shares["high"]) and all(s is None for s in shares["none"])
    assert "fp inputs 100.00%" in (tmp_path / "low" / "quantize.log").read_text()


def test_w6a6_checkpoint_is_treeqs_own_and_loads_to_the_same_logits(tmp_path, tokenizer, text_file):
    """6-bit weights pack 16 codes in 3 words; GPTQ loaders know no 6-bit, so the label is treeq."""
    src = save_model_dir(tmp_path / "src", "llama", tokenizer)
    report = quantize(src, tmp_path / "q", text_file, method="gptq", bits=6, group_size=32, activations=dict(bits=6))
    assert treeq.inspect_checkpoint(tmp_path / "q").quantization["quant_method"] == "treeq"
    loaded, _ = treeq.load(tmp_path / "q")
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, report.model(ids).logits, rtol=0, atol=1e-5)


def test_smoothquant_search_picks_the_strength_with_the_least_quantized_output_error():
    """Inputs with three outlier channels at 4 bits, weights at 8: the strength picked is one of the
    grid's, its quantized output error the least of the grid's (the test's own error), below fixed
    alpha 0.5's. Checked failing with the search keeping the largest error."""
    from treeq.transforms.base import InputSample
    from treeq.transforms.smoothquant import ALPHAS, SmoothQuant

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=gen)
    x[:, :3] *= 40
    stats = InputStats(64, torch.device("cpu"))
    stats.add(x)
    weights = [torch.randn(32, 64, generator=gen) * 0.05]
    a4 = FakeQuantActivation(ActivationScheme(bits=4), 64)
    round_weight = lambda w: fake_quantize_activation(w, 8)  # noqa: E731  per-row 8-bit weights
    sample = InputSample(x, lambda xs, s: a4(xs))

    def error(s):
        return float(((a4(x / s) @ round_weight(weights[0] * s).T - x @ weights[0].T) ** 2).sum())

    searched = TRANSFORMS["smoothquant"]({"search": True}).scales(weights, stats, round_weight, sample)
    grid = {a: TRANSFORMS["smoothquant"]({"alpha": a}).scales(weights, stats, round_weight) for a in ALPHAS}
    errors = {a: error(s) for a, s in grid.items()}
    best = min(errors, key=errors.get)
    assert torch.equal(searched, grid[best]) and errors[best] < errors[0.5]
    assert SmoothQuant({"search": True}).sample_rows() > 0 and SmoothQuant({}).sample_rows() == 0


def test_smoothquant_search_quantizes_and_round_trips(tmp_path, tokenizer, text_file):
    src = save_model_dir(tmp_path / "src", "llama", tokenizer)
    act = dict(bits=8, granularity="per-tensor", dynamic=False)
    report = quantize(
        src, tmp_path / "q", text_file, method="rtn", migration="smoothquant", search=True, activations=act
    )
    loaded, _ = treeq.load(tmp_path / "q")
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, report.model(ids).logits, rtol=0, atol=1e-5)
