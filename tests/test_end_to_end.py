import csv
import json

import pytest
import torch
from conftest import ARCHS, make_model

import treeq
from treeq.engine.plan import MethodPlan
from treeq.models import spec_for
from treeq.runtime.quant_linear import QuantLinear
from treeq.spec_check import check_spec


def quick_config(**kw):
    base = dict(method="gptq", bits=4, group_size=32, calib_samples=8, seqlen=64, batch_size=4)
    base.update(kw)
    return treeq.QuantConfig(**base)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_spec_fits_each_tiny_model(arch):
    model = make_model(arch)
    check_spec(model, spec_for(model.config))


@pytest.mark.parametrize("arch", ARCHS)
def test_quantize_save_load_gives_the_same_logits(arch, tmp_path, tokenizer, text_file):
    model = make_model(arch)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    fp_logits = logits(model, ids)
    report = treeq.quantize(model, quick_config(), tmp_path / "q", tokenizer=tokenizer, calib_text=str(text_file))
    mem_logits = logits(report.model, ids)
    loaded, _ = treeq.load(tmp_path / "q")
    assert sum(isinstance(m, QuantLinear) for m in loaded.modules()) == 2 * 7
    torch.testing.assert_close(logits(loaded, ids), mem_logits, rtol=1e-4, atol=1e-5)
    # Quantization changed the model, but not beyond recognition.
    assert not torch.allclose(mem_logits, fp_logits)
    assert torch.nn.functional.cosine_similarity(mem_logits.flatten(), fp_logits.flatten(), dim=0) > 0.9


def test_loading_in_bf16_puts_every_unquantized_tensor_in_bf16(tmp_path, tokenizer, text_file):
    model = make_model("llama")
    treeq.quantize(model, quick_config(), tmp_path / "q", tokenizer=tokenizer, calib_text=str(text_file))
    loaded, _ = treeq.load(tmp_path / "q", dtype=torch.bfloat16)
    quantized = {n for n, m in loaded.named_modules() if isinstance(m, QuantLinear)}
    outside = {n: p.dtype for n, p in loaded.named_parameters() if n.rsplit(".", 1)[0] not in quantized}
    assert "lm_head.weight" in outside or "model.embed_tokens.weight" in outside
    assert set(outside.values()) == {torch.bfloat16}, outside
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    assert logits(loaded, ids).dtype == torch.bfloat16


def test_fake_quant_weight_in_memory_equals_what_the_kernel_reconstructs(tmp_path, tokenizer, text_file):
    model = make_model("llama")
    results = {}
    from treeq.data import calibration_batches
    from treeq.engine.looper import quantize_layers

    cfg = quick_config(desc_act=True, sym=False, bits=3)
    batches = calibration_batches(tokenizer, text_file.read_text(), 8, 64, 4)
    results = quantize_layers(model, spec_for(model.config), MethodPlan(cfg), batches, torch.device("cpu"))
    from treeq.storage.checkpoint import swap_in_quantized

    fake = {name: model.get_submodule(name).weight.detach().clone() for name in results}
    swap_in_quantized(model, results, cfg)
    for name, w in fake.items():
        assert torch.equal(model.get_submodule(name).dequantized_weight(), w), name


def test_act_order_checkpoint_loads_with_its_g_idx(tmp_path, tokenizer, text_file):
    model = make_model("llama")
    report = treeq.quantize(
        model, quick_config(desc_act=True), tmp_path / "q", tokenizer=tokenizer, calib_text=str(text_file)
    )
    loaded, _ = treeq.load(tmp_path / "q")
    name = "model.layers.1.mlp.down_proj"
    saved, restored = report.model.get_submodule(name), loaded.get_submodule(name)
    assert not torch.equal(restored.g_idx, torch.arange(128, dtype=torch.int32) // 32)  # really permuted
    assert torch.equal(restored.g_idx, saved.g_idx)
    assert torch.equal(restored.dequantized_weight(), saved.dequantized_weight())
    qcfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qcfg["desc_act"] is True and qcfg["quant_method"] == "gptq" and qcfg["bits"] == 4


def test_checkpoint_files_and_quant_log(tmp_path, tokenizer, text_file):
    model = make_model("qwen2")  # qkv biases
    treeq.quantize(
        model, quick_config(method="rtn", bits=8), tmp_path / "q", tokenizer=tokenizer, calib_text=str(text_file)
    )
    out = tmp_path / "q"
    for f in ("model.safetensors", "config.json", "quantize_config.json", "quant_log.csv", "tokenizer.json"):
        assert (out / f).is_file(), f
    rows = list(csv.DictReader(open(out / "quant_log.csv")))
    assert len(rows) == 14
    assert {"layer", "module", "in_features", "out_features", "loss", "samples", "seconds", "peak_mem_mb"} <= set(
        rows[0]
    )
    assert all(float(r["loss"]) >= 0 and int(r["samples"]) == 8 * 64 for r in rows)
    meta = json.loads((out / "quantize_config.json").read_text())["meta"]
    assert meta["method"] == "rtn" and meta["treeq_version"] == treeq.__version__
    assert len(meta["modules"]) == 14
    assert not list(tmp_path.glob(".*partial"))


def test_gptq_beats_rtn_on_a_whole_tiny_model(tmp_path, tokenizer, text_file):
    errors = {}
    for method in ("rtn", "gptq"):
        model = make_model("llama")
        report = treeq.quantize(
            model,
            quick_config(method=method, bits=3),
            tmp_path / method,
            tokenizer=tokenizer,
            calib_text=str(text_file),
        )
        errors[method] = sum(r.loss for r in report.log.records)
    assert errors["gptq"] < errors["rtn"]


def test_failed_run_leaves_no_output(tmp_path, tokenizer, text_file, monkeypatch):
    import treeq.storage.checkpoint as ckpt

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ckpt, "save_file", boom)
    with pytest.raises(RuntimeError):
        treeq.quantize(make_model(), quick_config(), tmp_path / "q", tokenizer=tokenizer, calib_text=str(text_file))
    assert list(tmp_path.iterdir()) == [text_file]


def test_parallel_workers_give_bit_identical_results(tokenizer, text_file):
    from treeq.data import calibration_batches
    from treeq.engine.looper import quantize_layers

    cfg = quick_config(desc_act=True)
    batches = calibration_batches(tokenizer, text_file.read_text(), 8, 64, 4)
    runs = []
    for workers in (1, 3):
        model = make_model("llama")
        runs.append(
            quantize_layers(
                model, spec_for(model.config), MethodPlan(cfg), batches, torch.device("cpu"), workers=workers
            )
        )
    assert runs[0].keys() == runs[1].keys()
    for name in runs[0]:
        a, b = runs[0][name], runs[1][name]
        assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales) and torch.equal(a.g_idx, b.g_idx)


@pytest.mark.parametrize(
    "settings, expected",
    [
        (dict(method="rtn"), False),
        (dict(desc_act=True, static_groups=True), False),
        (dict(desc_act=False), False),
        (dict(desc_act=True), True),
    ],
)
def test_checkpoint_desc_act_says_whether_g_idx_is_permuted(settings, expected, tmp_path, tokenizer, text_file):
    report = treeq.quantize(
        make_model(), quick_config(**settings), tmp_path / "q", tokenizer=tokenizer, calib_text=str(text_file)
    )
    assert json.loads((tmp_path / "q" / "quantize_config.json").read_text())["desc_act"] is expected
    layer = report.model.get_submodule("model.layers.0.self_attn.q_proj")
    assert layer.fmt.desc_act is expected
