import json

import pytest
import torch
from conftest import make_model
from test_cli import quantize_args, run

from treeq import TreeqError
from treeq.config import QuantConfig
from treeq.data import calibration_batches
from treeq.engine.looper import quantize_layers
from treeq.engine.plan import MethodPlan
from treeq.engine.quant_log import QuantLog
from treeq.methods import make_method
from treeq.models import spec_for
from treeq.runtime.quant_linear import QuantLinear
from treeq.storage.checkpoint import save_quantized, swap_in_quantized
from treeq.storage.loading import load_quantized

FAST = {"epochs": [3, 2], "train_rows": 96, "val_rows": 32, "batch_rows": 32}


def outlier_inputs(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    x[:, : d // 16] *= 20  # a few loud channels, as real activations have
    return x


def config(**kw):
    base = dict(method="paroquant", bits=4, group_size=32, calib_samples=8, seqlen=64, batch_size=4, options=FAST)
    return QuantConfig(**(base | kw))


def fitted(seed=0, **options):
    method = make_method(config(options=FAST | options))
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(seed)) * 0.02
    stats = method.stats(128, torch.device("cpu"))
    for chunk in outlier_inputs(1024, 128, seed).split(256):
        stats.add(chunk)
    return w, stats, method.quantize(w, stats)


def test_row_sample_is_seeded_uniform_and_bounded():
    method = make_method(config())
    a, b = (method.stats(16, torch.device("cpu")) for _ in range(2))
    x = torch.arange(2000 * 16, dtype=torch.float32).reshape(2000, 16)
    for s in (a, b):
        for chunk in x.split(300):
            s.add(chunk)
    assert a.rows.shape == (128, 16) and torch.equal(a.rows, b.rows)
    picked = (a.rows[:, 0] / 16).long()
    assert len(set(picked.tolist())) == 128 and picked.max() > 1500 and picked.min() < 500


@pytest.mark.parametrize("schedule", ["round_robin", "random"])
def test_paroquant_beats_rtn_on_outlier_inputs(schedule):
    w, stats, result = fitted(schedule=schedule)
    rtn = make_method(QuantConfig(method="rtn", bits=4, group_size=32, sym=False)).quantize(w, stats)
    assert result.loss < 0.8 * rtn.loss, (result.loss, rtn.loss)
    assert result.transform is not None and result.transform.krot == 8
    assert not torch.allclose(result.transform.channel_scales, torch.ones(128))


def test_exported_layer_computes_the_fake_quant_weight():
    w, stats, result = fitted()
    from treeq.storage.checkpoint import linear_format

    fmt = linear_format(config().weights, torch.nn.Linear(128, 64), desc_act=False, sym=False)
    layer = QuantLinear.from_result(fmt, result, None)
    torch.testing.assert_close(layer.effective_weight(), result.weight(), rtol=0, atol=1e-6)
    x = outlier_inputs(8, 128, seed=9)
    torch.testing.assert_close(layer(x), x @ result.weight().T, rtol=1e-4, atol=1e-5)


def test_saved_checkpoint_loads_to_the_in_memory_pseudo_quantized_logits(tmp_path, tokenizer, text_file):
    model, cfg = make_model("llama"), config()
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    batches = calibration_batches(tokenizer, text_file.read_text(), 8, 64, 4)
    results = quantize_layers(model, spec_for(model.config), MethodPlan(cfg), batches, torch.device("cpu"), workers=2)
    with torch.no_grad():
        pseudo = model(input_ids=ids).logits
    swap_in_quantized(model, results, cfg)
    save_quantized(model, tokenizer, cfg, results, tmp_path / "q", QuantLog(echo=lambda _: None))
    loaded, _ = load_quantized(tmp_path / "q")
    layer = loaded.get_submodule("model.layers.1.mlp.down_proj")
    assert layer.pairs.dtype == torch.int16 and layer.pairs.shape == (8, 128) and layer.theta.shape == (8, 64)
    with torch.no_grad():
        restored = loaded(input_ids=ids).logits
    assert ((restored - pseudo).norm() / pseudo.norm()).item() < 1e-3
    qcfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qcfg["input_transform"]["rotation"] == {"kind": "pairwise_givens", "krot": 8, "group_size": "weights"}
    assert qcfg["sym"] is False  # learned zero points, whatever sym asked


@pytest.mark.parametrize("group_size", [-1, 32])
def test_modules_of_different_widths_share_one_rotation_record(group_size, tmp_path, tokenizer, text_file):
    # ParoQuant rotates within each module's weight groups: with group_size -1 the attention inputs
    # (64 wide) and down_proj's (128) rotate in groups of their own width. The checkpoint's one
    # transform record held one number, so saving failed after every layer was quantized.
    import treeq

    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    cfg = config(group_size=group_size, options=FAST | {"krot": 2})
    report = treeq.quantize(make_model("llama"), cfg, tmp_path / "q", tokenizer=tokenizer, calib_text=str(text_file))
    config_json = tmp_path / "q" / "config.json"
    full = json.loads(config_json.read_text())
    assert full["quantization_config"]["input_transform"]["rotation"]["group_size"] == "weights"
    with torch.no_grad():
        expected = report.model(input_ids=ids).logits
        assert torch.equal(treeq.load(tmp_path / "q")[0](input_ids=ids).logits, expected)
        if group_size != -1:  # checkpoints written before the record could say "weights" held the number
            full["quantization_config"]["input_transform"]["rotation"]["group_size"] = group_size
            config_json.write_text(json.dumps(full))
            assert torch.equal(treeq.load(tmp_path / "q")[0](input_ids=ids).logits, expected)


def test_cli_quantize_with_options_and_inspect_shows_the_transform(model_dir, text_file, tmp_path):
    out = tmp_path / "q"
    opts = [a for k, v in FAST.items() for a in ("--option", f"{k}={json.dumps(v)}")]
    r = run(*quantize_args(model_dir, text_file, out, "--method", "paroquant", "--option", "krot=4", *opts))
    assert r.exit_code == 0, r.output
    r = run("inspect", out)
    assert r.exit_code == 0, r.output
    assert "method: paroquant" in r.output and "sym: False" in r.output
    assert "input transform (before the matmul): x / channel_scales, then 4 layers of pairwise rotations" in r.output


@pytest.mark.parametrize(
    ("method", "options", "needle"),
    [
        ("paroquant", {"krot": -1}, "options.krot"),
        ("paroquant", {"schedule": "spiral"}, "options.schedule"),
        ("paroquant", {"rotations": 3}, "options.rotations"),
        ("rtn", {"krot": 8}, "takes no options"),
    ],
)
def test_bad_options_name_the_field(method, options, needle):
    with pytest.raises(TreeqError, match=needle):
        QuantConfig.build(method=method, options=options)
