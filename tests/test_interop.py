"""Checkpoints crossing to and from other tools: GPTQModel- and AutoAWQ-written ones (tests/fixtures,
made by tests/fixtures/make_peer_fixtures.py) load to the very weights each tool's own code
dequantizes, and the compressed-tensors pack-quantized export is the layout that package documents,
read back by treeq and (where the package is installed) by transformers."""

import json
from pathlib import Path

import pytest
import torch
from conftest import make_model
from safetensors.torch import load_file, save_file

import treeq
from treeq.runtime.quant_linear import QuantLinear

FIXTURES = Path(__file__).parent / "fixtures"
IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("fixture", ["gptqmodel-w4g32-sym-actorder", "gptqmodel-w4g32-asym", "autoawq-gemm-w4g32"])
def test_other_tools_checkpoints_load_to_the_weights_they_dequantize(fixture):
    """Checked failing with AWQ's nibble order read as GPTQ's (treeq/formats/awq.py's AWQ_ORDER
    replaced by 0..7), which every AutoAWQ module then mismatched."""
    path = FIXTURES / fixture
    theirs = load_file(path / "reference" / "dequantized.safetensors")
    model, _ = treeq.load(path)
    ours = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert ours.keys() == theirs.keys() and len(ours) == 14
    for name, layer in ours.items():
        # Their fp16 (code - zero) * scale is the fp32 product rounded once, as .half() rounds it.
        assert torch.equal(layer.dequantized_weight().half(), theirs[name]), name
    assert torch.isfinite(logits(model)).all()


def ct_config(**kw):
    base = dict(method="rtn", bits=4, group_size=32, calib_samples=8, seqlen=64, batch_size=4)
    return treeq.QuantConfig(**{**base, "checkpoint_format": "compressed-tensors", **kw})


def pack_like_compressed_tensors(q: torch.Tensor, bits: int) -> torch.Tensor:
    """compressed-tensors' documented packing, written out: signed values [rows, cols] plus
    2^(bits-1), value j of a row at bits j*bits .. of that row's bit stream, 32-bit words."""
    rows, cols = q.shape
    unsigned = (q.long() + 2 ** (bits - 1)).tolist()
    words = torch.zeros(rows, cols * bits // 32, dtype=torch.int64)
    for r in range(rows):
        for j, v in enumerate(unsigned[r]):
            words[r, j * bits // 32] |= v << (j * bits % 32)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


@pytest.mark.parametrize(
    "settings, strategy",
    [(dict(), "group"), (dict(sym=False), "group"), (dict(bits=8, group_size=-1, sym=False), "channel")],
)
def test_compressed_tensors_export_is_their_layout_and_loads_back(settings, strategy, tmp_path, tokenizer, text_file):
    report = treeq.quantize(
        make_model("llama"), ct_config(**settings), tmp_path / "q", tokenizer=tokenizer, calib_text=str(text_file)
    )
    qcfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    weights = qcfg["config_groups"]["group_0"]["weights"]
    bits, sym = weights["num_bits"], weights["symmetric"]
    assert (qcfg["quant_method"], qcfg["format"], qcfg["quantization_status"]) == (
        "compressed-tensors",
        "pack-quantized",
        "compressed",
    )
    assert weights["strategy"] == strategy and weights["type"] == "int" and qcfg["ignore"] == ["lm_head"]
    state = load_file(tmp_path / "q" / "model.safetensors")
    for name, layer in report.model.named_modules():
        if not isinstance(layer, QuantLinear):
            continue
        mid = 2 ** (bits - 1)
        codes, zeros = layer.codes().long() - mid, layer.zeros().long() - mid  # [out, in], [groups, out]
        assert torch.equal(state[f"{name}.weight_packed"], pack_like_compressed_tensors(codes, bits)), name
        assert torch.equal(state[f"{name}.weight_scale"], layer.scales.T)
        assert state[f"{name}.weight_shape"].tolist() == [layer.out_features, layer.in_features]
        if sym:
            assert f"{name}.weight_zero_point" not in state and not zeros.any()
        else:  # packed along the output channels
            packed = pack_like_compressed_tensors(zeros, bits).T
            assert torch.equal(state[f"{name}.weight_zero_point"], packed), name
    loaded, _ = treeq.load(tmp_path / "q")
    torch.testing.assert_close(logits(loaded), logits(report.model), rtol=0, atol=0)


def test_a_compressed_tensors_checkpoint_written_elsewhere_loads(tmp_path, tokenizer, text_file):
    """A treeq GPTQ checkpoint restated tensor by tensor in the pack-quantized layout, with the
    quantization_config llm-compressor writes and nothing of treeq's: computes the same."""
    cfg = ct_config(sym=False, checkpoint_format="gptq")
    treeq.quantize(make_model("llama"), cfg, tmp_path / "g", tokenizer=tokenizer, calib_text=str(text_file))
    gptq, _ = treeq.load(tmp_path / "g")
    state = {}
    for key, t in load_file(tmp_path / "g" / "model.safetensors").items():
        name, _, kind = key.rpartition(".")
        if kind == "qweight":
            layer = gptq.get_submodule(name)
            state[f"{name}.weight_packed"] = pack_like_compressed_tensors(layer.codes().long() - 8, 4)
            zero_point = pack_like_compressed_tensors(layer.zeros().long() - 8, 4)  # along the outputs
            state[f"{name}.weight_zero_point"] = zero_point.T.contiguous()
            state[f"{name}.weight_scale"] = layer.scales.T.contiguous()
            state[f"{name}.weight_shape"] = torch.tensor([layer.out_features, layer.in_features])
        elif kind not in ("qzeros", "scales", "g_idx"):
            state[key] = t
    out = tmp_path / "ct"
    out.mkdir()
    save_file(state, out / "model.safetensors")
    hf = json.loads((tmp_path / "g" / "config.json").read_text())
    weights = dict(num_bits=4, type="int", symmetric=False, group_size=32, strategy="group", dynamic=False)
    hf["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None}},
        "ignore": ["lm_head"],
    }
    (out / "config.json").write_text(json.dumps(hf))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (out / f).write_bytes((tmp_path / "g" / f).read_bytes())
    loaded, _ = treeq.load(out)
    torch.testing.assert_close(logits(loaded), logits(gptq), rtol=0, atol=0)
    assert treeq.inspect_checkpoint(out).quantization["checkpoint_format"] == "pack-quantized"


def test_compressed_tensors_export_refuses_what_the_layout_cannot_hold():
    with pytest.raises(treeq.TreeqError, match="no g_idx for act-order groups"):
        treeq.QuantConfig.build(method="gptq", checkpoint_format="compressed-tensors")
    with pytest.raises(treeq.TreeqError, match="holds 4- or 8-bit integer grids, not 4-bit half-step"):
        treeq.QuantConfig.build(method="rtn", grid="half-step", checkpoint_format="compressed-tensors")


@pytest.mark.parametrize("settings", [dict(), dict(bits=8, group_size=-1)], ids=["w4g32", "w8-per-row"])
def test_transformers_loads_the_compressed_tensors_export(settings, tmp_path, tokenizer, text_file):
    pytest.importorskip("compressed_tensors", reason="transformers reads pack-quantized through that package")
    from transformers import AutoModelForCausalLM

    cfg = ct_config(**settings)
    treeq.quantize(make_model("llama"), cfg, tmp_path / "q", tokenizer=tokenizer, calib_text=str(text_file))
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32)
    ours, _ = treeq.load(tmp_path / "q")
    torch.testing.assert_close(logits(theirs), logits(ours), rtol=0, atol=0)
