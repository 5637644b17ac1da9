"""AutoAWQ's GEMM layout: export from treeq, and AWQ checkpoints as other tools write them load."""

import json

import pytest
import torch
from conftest import make_model
from safetensors.torch import load_file, save_file

import treeq
from treeq import packing
from treeq.errors import TreeqError
from treeq.formats.awq import pack_rows, unpack_rows
from treeq.runtime.quant_linear import QuantLinear

# AutoAWQ's word layout, written out by hand: nibble i of word c holds output channel 8c + ORDER[i].
ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def awq_pack_by_hand(codes: torch.Tensor) -> torch.Tensor:
    rows, cols = codes.shape
    words = torch.zeros(rows, cols // 8, dtype=torch.int64)
    for c in range(cols // 8):
        for i in range(8):
            words[:, c] |= codes[:, 8 * c + ORDER[i]].long() << (4 * i)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def config(**kw):
    base = dict(bits=4, group_size=32, calib_samples=8, seqlen=64, batch_size=4, checkpoint_format="awq")
    return treeq.QuantConfig(**{**base, **kw})


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))


def test_skipped_modules_are_named_for_awq_loaders(tmp_path, tokenizer, text_file):
    # transformers, AutoAWQ and vLLM replace every linear by an AWQ layer unless modules_to_not_convert
    # names it; without the list they looked for a qweight the skipped down_proj does not have.
    # Checked to fail with the list left out.
    from transformers.quantizers.quantizers_utils import should_convert_module

    cfg = config(method="rtn", sym=False, overrides=[{"pattern": r".*down_proj", "skip": True}])
    treeq.quantize(make_model("llama"), cfg, tmp_path / "q", tokenizer=tokenizer, calib_text=str(text_file))
    qcfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    state = load_file(tmp_path / "q" / "model.safetensors")
    linears = {k.rsplit(".", 1)[0] for k in state if ".layers." in k and k.endswith((".qweight", "proj.weight"))}
    converted = {m for m in linears if should_convert_module(m, qcfg["modules_to_not_convert"])}
    assert converted == {m for m in linears if f"{m}.qweight" in state}
    assert converted and converted != linears


def test_word_layout_is_awqs():
    codes = torch.randint(0, 16, (5, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(pack_rows(codes), awq_pack_by_hand(codes))
    assert torch.equal(unpack_rows(pack_rows(codes)), codes)


@pytest.mark.parametrize("method,extra", [("awq", {}), ("gptq", {"static_groups": True}), ("rtn", {"sym": False})])
def test_awq_export_loads_with_the_same_logits(method, extra, tmp_path, tokenizer, text_file):
    model = make_model("llama")
    report = treeq.quantize(
        model, config(method=method, **extra), tmp_path / "q", tokenizer=tokenizer, calib_text=str(text_file)
    )
    qcfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert (qcfg["quant_method"], qcfg["version"], qcfg["bits"], qcfg["group_size"]) == ("awq", "gemm", 4, 32)
    state = load_file(tmp_path / "q" / "model.safetensors")
    qweight = state["model.layers.0.mlp.gate_proj.qweight"]
    assert qweight.shape == (64, 128 // 8) and not any(k.endswith(".g_idx") for k in state)
    loaded, _ = treeq.load(tmp_path / "q")
    assert sum(isinstance(m, QuantLinear) for m in loaded.modules()) == 2 * 7
    torch.testing.assert_close(logits(loaded, IDS), logits(report.model, IDS), rtol=1e-4, atol=1e-5)


def test_an_awq_checkpoint_written_elsewhere_loads(tmp_path, tokenizer, text_file):
    """A GPTQ checkpoint rewritten, tensor by tensor, the way AutoAWQ lays one out, with AutoAWQ's
    quantization_config and nothing of treeq's: loads and computes the same."""
    cfg = config(method="rtn", sym=False, checkpoint_format="gptq")
    treeq.quantize(make_model("llama"), cfg, tmp_path / "g", tokenizer=tokenizer, calib_text=str(text_file))
    state = load_file(tmp_path / "g" / "model.safetensors")
    awq = {}
    for key, t in state.items():
        name, _, kind = key.rpartition(".")
        if kind == "qweight":
            awq[key] = awq_pack_by_hand(packing.unpack(t, 4))
        elif kind == "qzeros":
            awq[key] = awq_pack_by_hand(packing.unpack(t.T.contiguous(), 4).T)
        elif kind != "g_idx":
            awq[key] = t
    out = tmp_path / "a"
    out.mkdir()
    for f in (tmp_path / "g").iterdir():
        if f.name not in ("model.safetensors", "quantize_config.json", "config.json"):
            (out / f.name).write_bytes(f.read_bytes())
    hf = json.loads((tmp_path / "g" / "config.json").read_text())
    hf["quantization_config"] = {
        "quant_method": "awq",
        "version": "gemm",
        "bits": 4,
        "group_size": 32,
        "zero_point": True,
    }
    (out / "config.json").write_text(json.dumps(hf))
    save_file(awq, out / "model.safetensors")
    a, _ = treeq.load(out)
    g, _ = treeq.load(tmp_path / "g")
    torch.testing.assert_close(logits(a, IDS), logits(g, IDS), rtol=0, atol=0)
    info = treeq.inspect_checkpoint(out)
    assert info.quantization["checkpoint_format"] == "awq_gemm" and len(info.kernels) == 2 * 7


@pytest.mark.parametrize(
    "kw,message",
    [
        (dict(method="gptq"), "no g_idx for act-order"),
        (dict(method="rtn", bits=3), "4-bit minmax grids only"),
        (dict(method="rtn", grid="half-step"), "4-bit minmax grids only"),
        (dict(method="paroquant"), "cannot hold paroquant's input transform"),
    ],
)
def test_settings_the_awq_layout_cannot_hold_are_refused_up_front(kw, message):
    with pytest.raises(TreeqError, match=message):
        treeq.QuantConfig.build(checkpoint_format="awq", **kw)
