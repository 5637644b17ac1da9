"""Checkpoints name tensors as the architecture's original checkpoints do (what GPTQModel and vLLM
look for), not as transformers 5 renames them in memory; the oracle is transformers' own
save_pretrained, which writes the original names back (its conversion_mapping.py reversed)."""

import json

import pytest
import torch
from conftest import MOE_ARCHS, make_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_end_to_end import logits, quick_config

import treeq
from treeq.engine.quant_log import QuantLog
from treeq.models import spec_for
from treeq.storage.loading import module_qcfg, read_quantization_config
from treeq.storage.names import runtime_name

IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
QUANTIZED = (".qweight", ".qzeros", ".scales", ".g_idx")


def quantized(arch, tmp_path, tokenizer, text_file, **kw):
    report = treeq.quantize(
        make_model(arch),
        quick_config(method="rtn", **kw),
        tmp_path / "q",
        tokenizer=tokenizer,
        calib_text=str(text_file),
        log=QuantLog(str),
    )
    return report.model


def keys(path):
    with safe_open(path / "model.safetensors", "pt") as f:
        return set(f.keys())


def owner(key: str) -> str:
    return key.rsplit(".", 1)[0]


@pytest.mark.parametrize("arch", ["llama", *MOE_ARCHS])
def test_every_tensor_has_its_original_checkpoint_name(arch, tmp_path, tokenizer, text_file):
    make_model(arch).save_pretrained(tmp_path / "fp")
    original = keys(tmp_path / "fp")
    model = quantized(arch, tmp_path, tokenizer, text_file)
    stored = keys(tmp_path / "q")
    # A quantized linear's tensors replace the original's weight under the same module name.
    as_original = {f"{owner(k)}.weight" if k.endswith(QUANTIZED) else k for k in stored}
    assert as_original == original
    if arch == "mixtral":
        assert "model.layers.1.block_sparse_moe.experts.7.w2.qweight" in stored
    qcfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert {f"{m}.weight" for m in qcfg["meta"]["modules"]} <= original
    loaded, _ = treeq.load(tmp_path / "q")
    assert torch.equal(logits(loaded, IDS), logits(model, IDS))


def test_checkpoints_written_under_in_memory_names_still_load(tmp_path, tokenizer, text_file):
    model = quantized("mixtral", tmp_path, tokenizer, text_file)
    spec = spec_for(model.config)
    weights = tmp_path / "q" / "model.safetensors"
    save_file({runtime_name(spec, k): v for k, v in load_file(weights).items()}, weights)
    assert "model.layers.0.mlp.experts.0.gate_proj.qweight" in keys(tmp_path / "q")
    loaded, _ = treeq.load(tmp_path / "q")
    assert torch.equal(logits(loaded, IDS), logits(model, IDS))


def test_overrides_hold_for_the_original_names(tmp_path, tokenizer, text_file):
    """dynamic's patterns were written against in-memory names; loaders match the stored ones."""
    overrides = [
        {"pattern": r".*\.experts\.0\.(gate|up)_proj$", "bits": 8},
        {"pattern": r".*experts\.1\.down", "skip": True},
    ]
    model = quantized("mixtral", tmp_path, tokenizer, text_file, overrides=overrides)
    qcfg = read_quantization_config(tmp_path / "q")
    layer = "model.layers.1.block_sparse_moe.experts"
    assert module_qcfg(qcfg, f"{layer}.0.w1")["bits"] == module_qcfg(qcfg, f"{layer}.0.w3")["bits"] == 8
    assert module_qcfg(qcfg, f"{layer}.0.w2")["bits"] == 4
    assert module_qcfg(qcfg, f"{layer}.1.w2") is None
    assert f"{layer}.1.w2.weight" in keys(tmp_path / "q")
    loaded, _ = treeq.load(tmp_path / "q")
    assert torch.equal(logits(loaded, IDS), logits(model, IDS))
