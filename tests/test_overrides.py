"""Per-module overrides (mixed precision): attention 8-bit, MLP 4-bit, the first layer kept in fp.
The checkpoint records them as GPTQModel's ``dynamic``; treeq.load, inspect and the v1 zero-point
conversion apply each module's own scheme."""

import json

import pytest
import torch
from conftest import make_model, save_model_dir
from test_cli import run
from test_end_to_end import logits, quick_config

import treeq
from treeq.errors import TreeqError
from treeq.runtime.quant_linear import QuantLinear

RECIPE = [
    {"pattern": r"model\.layers\.0\.", "skip": True},
    {"pattern": r".*self_attn\.", "bits": 8},
]


def expected_bits(name: str) -> int | None:
    if name.startswith("model.layers.0."):
        return None
    return 8 if ".self_attn." in name else 4


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_override_recipe_saves_loads_and_runs_each_modules_scheme(method, tmp_path, tokenizer, text_file):
    model = make_model("llama")
    fp_layer0 = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    cfg = quick_config(method=method, overrides=RECIPE)
    report = treeq.quantize(model, cfg, tmp_path / "q", tokenizer=tokenizer, calib_text=str(text_file))
    qcfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    # Symmetric, so v1 zero points: each module's own bits pack them (8-bit attention, 4-bit MLP).
    assert qcfg["format"] == "gptq" and qcfg["bits"] == 4
    assert qcfg["dynamic"] == {r"-:model\.layers\.0\.": {}, r"+:.*self_attn\.": {"bits": 8}}
    loaded, _ = treeq.load(tmp_path / "q")
    names = [n for n, m in loaded.named_modules() if isinstance(m, torch.nn.Linear | QuantLinear) and "layers" in n]
    assert len(names) == 14
    for name in names:
        layer = loaded.get_submodule(name)
        if expected_bits(name) is None:
            assert isinstance(layer, torch.nn.Linear) and not isinstance(layer, QuantLinear), name
        else:
            assert isinstance(layer, QuantLinear) and layer.fmt.bits == expected_bits(name), name
            assert torch.equal(layer.dequantized_weight(), report.model.get_submodule(name).dequantized_weight())
    assert torch.equal(loaded.model.layers[0].mlp.up_proj.weight, fp_layer0.half().float())  # stored in fp16
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits(loaded, ids), logits(report.model, ids), rtol=1e-4, atol=1e-5)
    assert {r.module.split(".")[0] for r in report.log.records} == {"self_attn", "mlp"}
    assert all(r.layer == 1 for r in report.log.records)


def test_cli_override_and_inspect_report_each_scheme(tmp_path, tokenizer, text_file):
    src = save_model_dir(tmp_path / "src", "llama", tokenizer)
    out = tmp_path / "q"
    r = run(
        "quantize", src, "--calib-text", text_file, "--calib-samples", 8, "--seqlen", 64, "--group-size", 32,
        "--method", "rtn", "--override", r"model\.layers\.0\.=skip", "--override", r".*self_attn\.=bits:8",
        "--out", out, "--threads", 2,
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    r = run("inspect", out, "--modules")
    assert r.exit_code == 0, r.output
    # Stored bits per weight: codes, then per group of 32 an fp16 scale and a packed zero point, and
    # each input channel's int32 g_idx over the module's outputs (k_proj: 32 outputs, so 1 bit).
    assert "scheme 8-bit g32 sym minmax: 4 modules, e.g. model.layers.1.self_attn.k_proj;" in r.output
    assert "scheme 4-bit g32 sym minmax: 3 modules, e.g. model.layers.1.mlp.down_proj;" in r.output
    info = treeq.inspect_checkpoint(out)
    k = info.formats["model.layers.1.self_attn.k_proj"]
    assert (k.bits, k.in_features, k.out_features) == (8, 64, 32)
    expected = 8 + (16 + 8) / 32 + 32 / 32  # codes, scale + zero per group, g_idx per input channel
    assert abs(info.bits_per_weight["model.layers.1.self_attn.k_proj"] - expected) < 1e-9
    assert "  model.layers.1.self_attn.v_proj\n" in r.output and "model.layers.0." not in r.output


def test_overrides_the_awq_layout_cannot_hold_are_refused():
    with pytest.raises(TreeqError, match="per-module schemes need checkpoint_format 'gptq'"):
        treeq.QuantConfig.build(method="rtn", checkpoint_format="awq", overrides=[{"pattern": "x", "bits": 8}])


def test_an_override_that_breaks_packing_is_refused_before_any_work(tmp_path, tokenizer, text_file):
    cfg = quick_config(method="rtn", overrides=[{"pattern": r".*mlp\.down_proj", "group_size": 48}])
    with pytest.raises(
        TreeqError, match="group_size=48 does not divide in_features=128 of model.layers.0.mlp.down_proj"
    ):
        treeq.quantize(make_model("llama"), cfg, tmp_path / "q", tokenizer=tokenizer, calib_text=str(text_file))
    assert not (tmp_path / "q").exists()


def test_sym_override_on_learned_zero_points_is_stored_as_asym(tmp_path, tokenizer, text_file):
    # ParoQuant learns its zero points even where sym=True was asked. The override's sym=True written
    # as given made treeq.load pick a kernel that ignores zero points (8-bit inputs: cpu_w8a8, whose
    # code - zero overflowed int8): logits 0.48 apart, top token the same at a third of positions.
    # Checked to fail with dynamic() writing the override's changes as given.
    model = make_model("llama", intermediate_size=64)  # one input width: ParoQuant's rotation groups agree
    cfg = quick_config(
        method="paroquant",
        bits=8,
        group_size=-1,
        sym=False,
        activations={"bits": 8},
        overrides=[{"pattern": r".*self_attn\.", "sym": True}],
        options={"epochs": (1, 1), "krot": 2, "train_rows": 64, "val_rows": 16, "batch_rows": 32},
    )
    report = treeq.quantize(model, cfg, tmp_path / "q", tokenizer=tokenizer, calib_text=str(text_file))
    learned = report.model.model.layers[0].self_attn.q_proj.zeros()
    assert not bool((learned == 128).all())  # the case under test: zero points off the middle code
    qcfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qcfg["dynamic"] == {r"+:.*self_attn\.": {"sym": False}}
    loaded, _ = treeq.load(tmp_path / "q")
    assert not loaded.model.layers[0].self_attn.q_proj.fmt.sym
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits(loaded, ids), logits(report.model, ids), rtol=1e-4, atol=1e-5)
