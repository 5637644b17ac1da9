"""Every method x grid x bits: refused by the config with a one-line error, or saved so that the
checkpoint read back from disk, through the kernel selection picks, rebuilds the method's own
fake-quant weight exactly."""

import pytest
import torch
from conftest import make_model

import treeq
import treeq.engine.looper
from treeq.engine.quant_log import QuantLog
from treeq.errors import TreeqError
from treeq.methods import METHODS
from treeq.numerics import GRIDS, SUPPORTED_BITS
from treeq.runtime.quant_linear import QuantLinear

# Enough ParoQuant training to move every learned part, little enough for the default test run.
QUICK_OPTIONS = {"paroquant": {"epochs": (1, 1), "krot": 2, "train_rows": 64, "val_rows": 16, "batch_rows": 32}}

COMBINATIONS = [(m, g, b) for m in sorted(METHODS) for g in GRIDS for b in SUPPORTED_BITS]


def settings(method, grid, bits):
    return dict(
        method=method,
        grid=grid,
        bits=bits,
        group_size=32,
        calib_samples=4,
        seqlen=32,
        batch_size=4,
        options=QUICK_OPTIONS.get(method, {}),
    )


def refusal(method, grid, bits) -> str | None:
    try:
        treeq.QuantConfig.build(**settings(method, grid, bits))
    except TreeqError as e:
        return str(e)
    return None


def test_refused_combinations_are_exactly_the_ones_that_cannot_hold():
    """The refusals, each one line naming the field: fp8-int4 is 4-bit only, qrazor 2-4 bits; ParoQuant learns a
    minmax grid of its own (it once accepted any grid and recorded the wrong one); SpQR fits minmax grids only."""
    refused = {c: refusal(*c) for c in COMBINATIONS if refusal(*c)}
    expected = {(m, "fp8-int4", b) for m in METHODS for b in SUPPORTED_BITS if b != 4}
    expected |= {(m, "qrazor", b) for m in METHODS for b in SUPPORTED_BITS if b > 4}  # 8 bits is its base grid
    expected |= {(m, g, b) for m in ("paroquant", "spqr") for g in GRIDS if g != "minmax" for b in SUPPORTED_BITS}
    expected |= {("bcq", g, b) for g in GRIDS for b in SUPPORTED_BITS if g != "minmax" or b > 4}  # 2-4 planes
    assert set(refused) == expected
    assert all("\n" not in msg for msg in refused.values())
    assert "quantizes onto grid 'minmax' only, not 'half-step'" in refused[("paroquant", "half-step", 4)]


def recorded_fake_quant(monkeypatch) -> dict[str, torch.Tensor]:
    """Filled, as a one-layer model is quantized, with each module's fake-quant weight by full name."""
    fake: dict[str, torch.Tensor] = {}
    original = treeq.engine.looper._quantize_subset

    def recording(layer, bound, *args, **kwargs):
        for name, result in original(layer, bound, *args, **kwargs):
            fake[f"model.layers.0.{name}"] = result.weight().clone()
            yield name, result

    monkeypatch.setattr(treeq.engine.looper, "_quantize_subset", recording)
    return fake


def quantized_and_loaded(cfg, path, tokenizer, text_file):
    """A one-layer tiny Llama quantized by ``cfg`` into ``path``, loaded back."""
    model = make_model("llama", num_hidden_layers=1)
    treeq.quantize(model, cfg, path, tokenizer=tokenizer, calib_text=str(text_file), log=QuantLog(str))
    return treeq.load(path)[0]


@pytest.mark.parametrize("method,grid,bits", [c for c in COMBINATIONS if refusal(*c) is None])
def test_checkpoint_rebuilds_the_methods_fake_quant_weight(
    method, grid, bits, tmp_path, tokenizer, text_file, monkeypatch
):
    fake = recorded_fake_quant(monkeypatch)
    loaded = quantized_and_loaded(
        treeq.QuantConfig(**settings(method, grid, bits)), tmp_path / "q", tokenizer, text_file
    )
    assert len(fake) == 7
    for name, w in fake.items():
        layer = loaded.get_submodule(name)
        assert isinstance(layer, QuantLinear) and layer.fmt.grid == grid
        assert torch.equal(layer.effective_weight(), w), name
        # Through the kernel selection picked: an identity input returns W^T.
        out = layer(torch.eye(layer.in_features)) - (0 if layer.bias is None else layer.bias)
        if layer.transform is None:
            assert torch.equal(out, w.T), name
        else:  # rotations and channel scales applied to the input reassociate the arithmetic
            torch.testing.assert_close(out, w.T, rtol=1e-5, atol=1e-6)
