"""Mixture-of-experts: per-expert quantization, checkpoints, routing control and fallback."""

import csv
import json

import pytest
import torch
from conftest import MOE_ARCHS, make_model, save_model_dir
from safetensors import safe_open
from test_cli import one_line_error, quantize_args, run
from test_end_to_end import assert_near_plain_rounding, logits, quick_config

import treeq
from treeq.engine.experts import UnfusedExperts, unfuse_experts
from treeq.engine.quant_log import QuantLog
from treeq.models import spec_for
from treeq.runtime.quant_linear import QuantLinear
from treeq.spec_check import check_spec
from treeq.storage.names import upstream_name


def quantize(model, tmp_path, tokenizer, text_file, name="q", workers=None, devices=None, **kw):
    return treeq.quantize(
        model,
        quick_config(**kw),
        tmp_path / name,
        tokenizer=tokenizer,
        calib_text=str(text_file),
        log=QuantLog(str),
        workers=workers,
        devices=devices,
    )


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_spec_fits_fused_and_unfused(arch):
    model = make_model(arch)
    spec = spec_for(model.config)
    check_spec(model, spec)
    unfuse_experts(model, spec)
    check_spec(model, spec)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_unfused_experts_run_exactly_like_the_fused_ones(arch):
    model = make_model(arch)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    fused = logits(model, ids)
    unfuse_experts(model, spec_for(model.config))
    # Exactly: each expert's linears hold the fused tensors' rows, and route the same tokens.
    assert torch.equal(logits(model, ids), fused)


def test_each_expert_sees_only_its_tokens_and_bypass_keeps_the_output():
    model = make_model("mixtral")
    unfuse_experts(model, spec_for(model.config))
    block = model.model.layers[0].mlp
    experts: UnfusedExperts = block.experts
    hidden = torch.randn(10, 64, generator=torch.Generator().manual_seed(0))
    index = torch.tensor([[0, 1]] * 5 + [[1, 2]] * 5)
    weights = torch.rand(10, 2, generator=torch.Generator().manual_seed(1))
    seen = []
    experts.gate_up_tap.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        normal = experts(hidden, index, weights)
        experts.bypass = True
        bypassed = experts(hidden, index, weights)
    routed, everything = seen
    assert torch.equal(routed[0], hidden[:5]) and torch.equal(routed[1], hidden) and torch.equal(routed[2], hidden[5:])
    assert all(len(x) == 0 for x in routed[3:])
    assert all(torch.equal(x, hidden) for x in everything)
    torch.testing.assert_close(bypassed, normal)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_quantize_save_load_gives_the_same_logits(arch, tmp_path, tokenizer, text_file):
    model = make_model(arch)
    router = model.model.layers[-1].mlp.gate.weight.detach().clone()
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    fp = logits(model, ids)
    report = quantize(model, tmp_path, tokenizer, text_file)
    mem = logits(report.model, ids)
    loaded, _ = treeq.load(tmp_path / "q")
    # Exactly (the in-memory model was rounded to the stored fp16 tensors); checked failing for
    # all five specs with that rounding skipped (round_to_storage_ a no-op).
    assert torch.equal(logits(loaded, ids), mem)
    # About as close to fp as plain rounding at the same bits (the margin and its check: see there).
    assert not torch.allclose(mem, fp)
    assert_near_plain_rounding(arch, mem, loaded, ids, fp)
    # Every expert is its own quantized module, on disk under its own keys; the router stays fp.
    n_experts = model.config.num_local_experts if arch in ("mixtral", "deepseek_v3") else model.config.num_experts
    last = len(loaded.model.layers) - 1
    quantized = [n for n, m in loaded.named_modules() if isinstance(m, QuantLinear)]
    assert sum(f"layers.{last}.mlp.experts." in n for n in quantized) == 3 * n_experts
    assert len(quantized) == len(report.log.records)
    with safe_open(tmp_path / "q" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    down = f"model.layers.{last}.mlp.experts.{n_experts - 1}.down_proj.qweight"
    assert upstream_name(spec_for(model.config), down) in keys  # Mixtral's: block_sparse_moe...w2
    # As stored: unquantized tensors are written in fp16 by default.
    assert torch.equal(loaded.model.layers[-1].mlp.gate.weight, router.half().float())


def _starved_model(n_experts=16):
    """16 experts top-2 whose router, in every layer, never prefers the last four experts."""
    model = make_model("qwen3_moe", num_experts=n_experts)
    with torch.no_grad():
        for layer in model.model.layers:
            w = layer.mlp.gate.weight
            w.normal_(generator=torch.Generator().manual_seed(2))
            w[-4:] = 0  # logit 0 while the others' spread is wide: rarely in a token's top 2
            w[:-4] *= 10
    return model


def _rows(path):
    return list(csv.DictReader(open(path / "quant_log.csv")))


def test_normal_routing_starves_experts_that_then_fall_back(tmp_path, tokenizer, text_file):
    report = quantize(_starved_model(), tmp_path, tokenizer, text_file)
    tokens, threshold = 8 * 64, 3  # 0.5% of the calibration tokens, rounded up
    rows = _rows(tmp_path / "q")
    experts = [r for r in rows if ".experts." in r["module"]]
    fell_back = [r for r in experts if r["fallback"]]
    assert fell_back and all(r["fallback"] == "rtn" and int(r["samples"]) < threshold for r in fell_back)
    assert all(int(r["samples"]) >= threshold for r in experts if not r["fallback"])
    assert all(not r["fallback"] for r in rows if ".experts." not in r["module"])
    # Each token went to exactly two experts, and the table counts each expert's own share.
    for layer in ("0", "1"):
        gates = [int(r["samples"]) for r in experts if r["layer"] == layer and r["module"].endswith("gate_proj")]
        assert len(gates) == 16 and sum(gates) == 2 * tokens
    assert not any(isinstance(m, torch.nn.Linear) for m in report.model.model.layers.modules())  # none left fp


def test_bypass_routing_feeds_every_expert_every_token(tmp_path, tokenizer, text_file):
    model = _starved_model()
    quantize(model, tmp_path, tokenizer, text_file, routing="bypass")
    experts = [r for r in _rows(tmp_path / "q") if ".experts." in r["module"]]
    assert len(experts) == 2 * 16 * 3
    assert all(int(r["samples"]) == 8 * 64 and not r["fallback"] for r in experts)
    assert all(not layer.mlp.experts.bypass for layer in model.model.layers)  # restored


def test_top_k_override_routes_each_token_to_that_many_experts(tmp_path, tokenizer, text_file):
    model = _starved_model()
    quantize(model, tmp_path, tokenizer, text_file, routing=4)
    for layer in ("0", "1"):
        rows = [r for r in _rows(tmp_path / "q") if r["layer"] == layer and r["module"].endswith("gate_proj")]
        assert sum(int(r["samples"]) for r in rows) == 4 * 8 * 64
    assert all(layer.mlp.gate.top_k == 2 for layer in model.model.layers)  # restored


def test_dispatch_over_two_devices_writes_the_serial_checkpoint_bit_for_bit(tmp_path, tokenizer, text_file):
    quantize(make_model("qwen2_moe"), tmp_path, tokenizer, text_file, "serial", workers=1, desc_act=True)
    quantize(make_model("qwen2_moe"), tmp_path, tokenizer, text_file, "two", devices="cpu,cpu", desc_act=True)
    weights = [(tmp_path / d / "model.safetensors").read_bytes() for d in ("serial", "two")]
    assert weights[0] == weights[1]


def test_top_k_beyond_the_experts_is_a_clear_error(tmp_path, tokenizer, text_file):
    with pytest.raises(treeq.TreeqError, match="routing=9 exceeds the 8 experts"):
        quantize(make_model("mixtral"), tmp_path, tokenizer, text_file, routing=9)


def test_cli_spec_check_and_quantize_with_routing(tokenizer, text_file, tmp_path):
    moe_dir = save_model_dir(tmp_path / "tiny-deepseek", "deepseek_v3", tokenizer)
    r = run("spec", "check", moe_dir)
    assert r.exit_code == 0, r.output
    assert "covers 72 linears in 3 layers" in r.output  # 5 MLA + 3 dense, then 2 x (5 + 8 x 3 experts + 3 shared)
    out = tmp_path / "q"
    extra = ("--routing", "all", "--fallback-fraction", 0.01, "--devices", "cpu,cpu")
    r = run(*quantize_args(moe_dir, text_file, out, *extra))
    assert r.exit_code == 0, r.output
    assert "mlp.experts.7.down_proj" in r.output and "fallback" in r.output
    settings = json.loads((out / "quantize_config.json").read_text())["meta"]["settings"]
    assert settings["calibration"]["routing"] == "all" and settings["calibration"]["fallback_fraction"] == 0.01
    one_line_error(run(*quantize_args(moe_dir, text_file, tmp_path / "bad", "--routing", "some")), "routing")
