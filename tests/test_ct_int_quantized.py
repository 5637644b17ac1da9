"""compressed-tensors' int-quantized W8A8 export: the layout and quantization_config llm-compressor
writes for its W8A8 preset, SmoothQuant folded in, read back by treeq and by transformers."""

import json

import pytest
import torch
from conftest import make_model
from safetensors.torch import load_file

import treeq
from treeq.runtime.quant_linear import QuantLinear

IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
W8A8 = dict(bits=8, group_size=-1, activations={}, checkpoint_format="compressed-tensors")
CALIBRATION = dict(calib_samples=8, seqlen=64, batch_size=4)


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def export(tmp_path, tokenizer, text_file):
    cfg = treeq.QuantConfig(
        method="rtn", migration="smoothquant", migration_options={"alpha": 0.8}, **W8A8, **CALIBRATION
    )
    return treeq.quantize(make_model("llama"), cfg, tmp_path / "q", tokenizer=tokenizer, calib_text=str(text_file))


def quantized(model) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def test_the_export_is_llm_compressors_w8a8_layout_with_smoothing_folded(tmp_path, tokenizer, text_file):
    report = export(tmp_path, tokenizer, text_file)
    qcfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert (qcfg["quant_method"], qcfg["format"]) == ("compressed-tensors", "int-quantized")
    (group,) = qcfg["config_groups"].values()
    assert group["format"] == "int-quantized" and group["targets"] == ["Linear"]
    weights, inputs = group["weights"], group["input_activations"]
    assert (weights["num_bits"], weights["type"], weights["symmetric"], weights["strategy"]) == (
        8,
        "int",
        True,
        "channel",
    )
    assert (inputs["num_bits"], inputs["type"], inputs["symmetric"]) == (8, "int", True)
    assert (inputs["strategy"], inputs["dynamic"]) == ("token", True)
    assert "lm_head" in qcfg["ignore"]
    stored = load_file(tmp_path / "q" / "model.safetensors")
    modules = quantized(report.model)
    assert {k.rsplit(".", 1)[1] for k in stored if k.rsplit(".", 1)[0] in modules} == {"weight", "weight_scale"}
    for name, layer in modules.items():
        weight, scale = stored[f"{name}.weight"], stored[f"{name}.weight_scale"]
        assert weight.dtype == torch.int8 and scale.shape == (layer.fmt.out_features, 1)
        # What compressed-tensors dequantizes (weight * scale) is the weight treeq runs.
        assert torch.equal(weight.float() * scale.float(), layer.dequantized_weight().float()), name
    # SmoothQuant's scales live in the stored norms (and weights): nothing else carries them.
    fp_norm = make_model("llama").model.layers[0].input_layernorm.weight
    assert not torch.equal(stored["model.layers.0.input_layernorm.weight"].float(), fp_norm.half().float())
    loaded, _ = treeq.load(tmp_path / "q")
    assert all(m.fmt.activation is not None for m in quantized(loaded).values())
    assert torch.equal(logits(loaded), logits(report.model))


def test_inspect_finds_every_int_quantized_linear(tmp_path, tokenizer, text_file):
    # Inspect looked for compressed-tensors' packed codes (weight_packed), which this layout never
    # writes: it reported no module, no kernel, and its bits per weight divided by zero.
    report = export(tmp_path, tokenizer, text_file)
    info = treeq.inspect_checkpoint(tmp_path / "q")
    modules = quantized(report.model)
    assert info.kernels.keys() == modules.keys()
    assert {n: f.activation for n, f in info.formats.items()} == {n: m.fmt.activation for n, m in modules.items()}
    for name, layer in modules.items():  # int8 codes plus one fp16 scale per row
        assert info.bits_per_weight[name] == 8 + 16 / layer.fmt.in_features, name


def test_an_int_quantized_checkpoint_without_treeqs_record_runs_its_inputs_per_token(tmp_path, tokenizer, text_file):
    """As llm-compressor writes it: the input scheme comes from input_activations alone."""
    report = export(tmp_path, tokenizer, text_file)
    config_file = tmp_path / "q" / "config.json"
    cfg = json.loads(config_file.read_text())
    del cfg["quantization_config"]["meta"]
    config_file.write_text(json.dumps(cfg))
    (tmp_path / "q" / "quantize_config.json").unlink()
    loaded, _ = treeq.load(tmp_path / "q")
    assert torch.equal(logits(loaded), logits(report.model))


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(activations=dict(outlier_threshold=6.0)), "without fp outlier columns, not 8-bit per-token"),
        (dict(activations=dict(granularity="per-tensor", dynamic=False)), "not 8-bit per-tensor sym static"),
        (dict(group_size=32), "int8 per-channel symmetric weights"),
        (dict(sym=False), "int8 per-channel symmetric weights"),
        (dict(bits=4), "int8 per-channel symmetric weights"),
    ],
)
def test_what_int_quantized_cannot_hold_exactly_is_refused_in_one_line(settings, message):
    with pytest.raises(treeq.TreeqError, match=message):
        treeq.QuantConfig.build(method="rtn", **{**W8A8, **settings})


class CompressedTensorsInputs(torch.nn.Module):
    """compressed-tensors' dynamic per-token int8 fake-quant: scale amax / 127.5, codes in [-128, 127]."""

    def forward(self, x):
        scale = x.abs().amax(-1, keepdim=True) / 127.5
        return torch.clamp(torch.round(x / scale), -128, 127) * scale


def test_transformers_loads_the_w8a8_export(tmp_path, tokenizer, text_file):
    """transformers runs the same weights and the same input scheme; its reference fake-quant takes
    amax / 127.5 per token where treeq (and vLLM's int8 kernels) take amax / 127, so the logits
    differ by that rounding alone: exactly equal once treeq's inputs are rounded the same way."""
    pytest.importorskip("compressed_tensors", reason="transformers reads int-quantized through that package")
    from transformers import AutoModelForCausalLM

    export(tmp_path, tokenizer, text_file)
    theirs = logits(AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32))
    ours_model, _ = treeq.load(tmp_path / "q", kernel="torch")  # a kernel that takes fake-quant inputs
    ours = logits(ours_model)
    # Measured on this tiny model: 1.1% of the largest logit; a 1/255 step change per token bounds it.
    assert (theirs - ours).abs().max() <= 0.02 * ours.abs().max()
    for layer in quantized(ours_model).values():
        layer.input_quantizer = CompressedTensorsInputs()
    assert torch.equal(logits(ours_model), theirs)
