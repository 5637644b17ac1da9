"""What a checkpoint says about itself: GPTQ labels other loaders read the same way treeq does,
zero points in the convention the label names, the storage dtype, the source's name and the card."""

import json

import pytest
import torch
from conftest import make_model
from safetensors.torch import load_file, save_file

import treeq
from treeq import packing
from treeq.formats import FormatSummary
from treeq.formats import gptq as gptq_format
from treeq.runtime.quant_linear import QuantLinear
from treeq.storage.checkpoint import quantization_config

IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
LAYER = "model.layers.0.self_attn.q_proj"


def config(**kw):
    base = dict(method="rtn", bits=4, group_size=32, calib_samples=8, seqlen=64, batch_size=4)
    return treeq.QuantConfig(**{**base, **kw})


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def quantize(tmp_path, tokenizer, text_file, name="q", model=None, **kw):
    model = make_model("llama") if model is None else model
    report = treeq.quantize(model, config(**kw), tmp_path / name, tokenizer=tokenizer, calib_text=str(text_file))
    qcfg = json.loads((tmp_path / name / "config.json").read_text())["quantization_config"]
    return report, qcfg, load_file(tmp_path / name / "model.safetensors")


def stored_zeros(state, bits=4, layer=LAYER):
    return packing.unpack(state[f"{layer}.qzeros"].T.contiguous(), bits).T


@pytest.mark.parametrize(
    "settings, quant_method, version, zero_offset",
    [
        (dict(), "gptq", "gptq", -1),  # symmetric: v1, zero - 1
        (dict(gptq_version=2), "gptq", "gptq_v2", 0),
        (dict(sym=False, gptq_version=1), "gptq", "gptq_v2", 0),  # asymmetric: always v2
        (dict(grid="half-step"), "treeq", "gptq_v2", 0),  # offset grid: not for GPTQ loaders
    ],
)
def test_labels_name_the_zero_point_convention_the_file_holds(
    settings, quant_method, version, zero_offset, tmp_path, tokenizer, text_file
):
    report, qcfg, state = quantize(tmp_path, tokenizer, text_file, **settings)
    assert (qcfg["quant_method"], qcfg["format"], qcfg["checkpoint_format"]) == (quant_method, version, version)
    assert "method" not in qcfg and qcfg["meta"]["method"] == "rtn" and qcfg["meta"]["zero_points"] == version
    in_memory = report.model.get_submodule(LAYER).zeros()
    assert torch.equal(stored_zeros(state).long(), in_memory.long() + zero_offset)
    loaded, _ = treeq.load(tmp_path / "q")
    assert torch.equal(loaded.get_submodule(LAYER).zeros(), in_memory)
    torch.testing.assert_close(logits(loaded), logits(report.model), rtol=0, atol=0)


def test_an_input_transform_gets_treeqs_own_quant_method():
    summary = FormatSummary(("m",), False, False, {"channel_scales": True})
    qcfg = quantization_config(treeq.QuantConfig(method="paroquant"), summary)
    assert qcfg["quant_method"] == "treeq" and qcfg["format"] == "gptq_v2" and "input_transform" in qcfg


def _rewrite_config(directory, **changes):
    path = directory / "config.json"
    cfg = json.loads(path.read_text())
    qcfg = cfg["quantization_config"]
    for key, value in changes.items():
        if value is None:
            qcfg.pop(key, None)
        else:
            qcfg[key] = value
    path.write_text(json.dumps(cfg))


def test_gptq_v1_from_other_tools_and_treeqs_earlier_v2_checkpoints_load(tmp_path, tokenizer, text_file):
    """A v1 checkpoint labelled as AutoGPTQ did (checkpoint_format only) or GPTQModel does (format
    only); and treeq's earlier labels, format gptq beside checkpoint_format gptq_v2, meaning v2."""
    report, _, _ = quantize(tmp_path, tokenizer, text_file, sym=False, gptq_version=2)
    expected = logits(report.model)
    v2_dir, v1_dir = tmp_path / "q", tmp_path / "v1"
    v1_dir.mkdir()
    for f in v2_dir.iterdir():
        (v1_dir / f.name).write_bytes(f.read_bytes())
    state = load_file(v2_dir / "model.safetensors")
    for key in [k for k in state if k.endswith(".qzeros")]:
        # v1 as GPTQModel writes it: 1 taken from every field by one subtraction per word, so a zero
        # point of 0 borrows from its neighbour.
        words = (state[key].long() - 0x11111111) % 2**32
        state[key] = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    save_file(state, v1_dir / "model.safetensors")
    (v1_dir / "quantize_config.json").unlink()
    for labels in (dict(format=None, checkpoint_format="gptq", meta=None), dict(format="gptq", checkpoint_format=None)):
        _rewrite_config(v1_dir, **labels)
        loaded, _ = treeq.load(v1_dir)
        torch.testing.assert_close(logits(loaded), expected, rtol=0, atol=0)
    meta = json.loads((v2_dir / "config.json").read_text())["quantization_config"]["meta"]
    meta.pop("zero_points")
    _rewrite_config(v2_dir, format="gptq", checkpoint_format="gptq_v2", meta=meta)
    loaded, _ = treeq.load(v2_dir)
    torch.testing.assert_close(logits(loaded), expected, rtol=0, atol=0)


def test_a_checkpoint_lacking_quantized_tensors_is_refused(tmp_path, tokenizer, text_file):
    quantize(tmp_path, tokenizer, text_file)
    state = load_file(tmp_path / "q" / "model.safetensors")
    del state[f"{LAYER}.scales"]
    save_file(state, tmp_path / "q" / "model.safetensors")
    with pytest.raises(treeq.TreeqError, match=f"lacks quantized tensors {LAYER}.scales"):
        treeq.load(tmp_path / "q")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_unquantized_tensors_are_stored_in_the_storage_dtype(dtype, tmp_path, tokenizer, text_file):
    model = make_model("qwen2")  # biases on q/k/v
    fp32_embed = model.model.embed_tokens.weight.detach().clone()
    report, _, state = quantize(tmp_path, tokenizer, text_file, model=model, storage_dtype=dtype)
    quantized = ("qweight", "qzeros", "scales", "g_idx")
    floats = {k: t.dtype for k, t in state.items() if k.rpartition(".")[2] not in quantized}
    assert "model.layers.0.self_attn.q_proj.bias" in floats and "model.norm.weight" in floats
    assert set(floats.values()) == {getattr(torch, dtype)}, floats
    assert {state[k].dtype for k in state if k.endswith(".scales")} == {torch.float16}
    assert json.loads((tmp_path / "q" / "config.json").read_text())["dtype"] == dtype
    # The model in memory computes what the checkpoint does: its tensors hold the stored values.
    assert report.model.model.embed_tokens.weight.dtype == torch.float32
    assert torch.equal(report.model.model.embed_tokens.weight, state["model.embed_tokens.weight"].float())
    assert torch.equal(state["model.embed_tokens.weight"], fp32_embed.to(getattr(torch, dtype)))
    loaded, _ = treeq.load(tmp_path / "q")
    torch.testing.assert_close(logits(loaded), logits(report.model), rtol=0, atol=0)


def test_a_tensor_beyond_fp16s_range_is_a_clear_error(tmp_path, tokenizer, text_file):
    model = make_model("llama")
    with torch.no_grad():
        model.model.norm.weight[0] = 1e6
    with pytest.raises(treeq.TreeqError, match="model.norm.weight has values beyond float16's range"):
        quantize(tmp_path, tokenizer, text_file, model=model)


def test_fp16_storage_halves_the_unquantized_bytes_and_inspect_compares_with_fp16(tmp_path, tokenizer, text_file):
    sizes = {}
    for dtype in ("float16", "float32"):
        quantize(tmp_path, tokenizer, text_file, name=dtype, storage_dtype=dtype)
        info = treeq.inspect_checkpoint(tmp_path / dtype)
        sizes[dtype] = info.size_bytes
    state = make_model("llama").state_dict()
    assert info.fp16_bytes == sum(t.numel() * 2 for t in state.values())
    unquantized = sum(t.numel() for k, t in state.items() if "_proj" not in k)
    # Two bytes fewer per unquantized value; the rest of the difference is the files' headers.
    assert abs(sizes["float32"] - sizes["float16"] - 2 * unquantized) < 1024


def test_meta_names_the_source_model_and_the_card_tells_how_to_load(model_dir, tmp_path, text_file):
    treeq.quantize(str(model_dir), config(), tmp_path / "q", calib_text=str(text_file))
    qcfg = json.loads((tmp_path / "q" / "quantize_config.json").read_text())
    assert qcfg["meta"]["source"] == "tiny-llama"
    assert str(tmp_path) not in (tmp_path / "q" / "config.json").read_text()
    card = (tmp_path / "q" / "README.md").read_text()
    assert card.startswith("---\n") and "base_model: tiny-llama" in card
    for needle in ("treeq.load(", "AutoModelForCausalLM.from_pretrained(", "vllm serve", "| group size | 32 |"):
        assert needle in card, needle
    treeq.quantize(str(model_dir), config(grid="half-step"), tmp_path / "h", calib_text=str(text_file))
    card = (tmp_path / "h" / "README.md").read_text()
    assert "Only treeq computes this checkpoint correctly (grid `half-step`)" in card and "vllm" not in card


def test_perplexity_measured_after_quantizing_goes_into_the_card(tmp_path, tokenizer, text_file):
    from treeq.eval.perplexity import PerplexityResult
    from treeq.storage.model_card import record_perplexity

    quantize(tmp_path, tokenizer, text_file)
    record_perplexity(tmp_path / "q", PerplexityResult(20.5, 4, 64, 252), PerplexityResult(22.25, 4, 64, 252))
    card = (tmp_path / "q" / "README.md").read_text()
    assert "| fp | 20.500" in card and "| quantized | 22.250" in card
    assert sum(isinstance(m, QuantLinear) for m in treeq.load(tmp_path / "q")[0].modules()) == 14


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_v1_zero_points_round_trip_including_gptqmodels_borrows(bits):
    zeros = torch.randint(0, 2**bits, (4, 96), generator=torch.Generator().manual_seed(bits))
    zeros[:, :3] = torch.tensor([0, 2**bits - 1, 0])  # a 0 beside the largest code: a borrow across fields
    qzeros = packing.pack(zeros.T.contiguous(), bits).T.contiguous()
    if bits == 3:  # fields straddle words; GPTQModel shifts each field on its own
        v1 = packing.pack(((zeros - 1) % 8).T.contiguous(), 3).T.contiguous()
    else:  # one subtraction per word, as GPTQModel writes v1
        ones = sum(1 << (bits * i) for i in range(32 // bits))
        words = (qzeros.long() - ones) % 2**32
        v1 = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    restored = gptq_format.from_v1({"m.qzeros": v1}, bits)["m.qzeros"]
    assert torch.equal(restored, qzeros)
    nonzero = zeros.clamp(min=1)
    packed = packing.pack(nonzero.T.contiguous(), bits).T.contiguous()
    assert torch.equal(gptq_format.from_v1(gptq_format.to_v1({"m.qzeros": packed}, bits), bits)["m.qzeros"], packed)
