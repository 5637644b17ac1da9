"""The BCQ method end to end: per-module loss against RTN, the layer through the LUT kernel, and a
checkpoint that loads to what the quantized model computed, run by the LUT kernel."""

import pytest
import torch
from conftest import make_model

import treeq
from treeq.engine.quant_log import QuantLog
from treeq.errors import TreeqError
from treeq.kernels import LinearFormat, cpu_lut_bcq
from treeq.methods import InputStats, make_method
from treeq.methods.base import row_output_errors
from treeq.runtime.quant_linear import QuantLinear

IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
needs_kernel = pytest.mark.skipif(cpu_lut_bcq.unavailable() is not None, reason=f"{cpu_lut_bcq.unavailable()}")


def stats_of(x):
    stats = InputStats(x.shape[1], torch.device("cpu"))
    stats.add(x)
    return stats


def correlated_inputs(n=64, tokens=512, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, n, generator=gen) @ torch.randn(n, n, generator=gen) * 0.2


@pytest.mark.parametrize("bits", [3, 4])
def test_bcq_loss_is_below_rtn_asym_and_error_feedback_lowers_it(bits):
    w = torch.distributions.StudentT(4.0).sample((64, 128)) * 0.02
    stats = stats_of(correlated_inputs(128))
    loss = {}
    for name, extra in [("rtn", {"sym": False}), ("bcq", {}), ("bcq_ef", {"error_feedback": True})]:
        method = "rtn" if name == "rtn" else "bcq"
        cfg = treeq.QuantConfig(method=method, bits=bits, group_size=32, **extra)
        loss[name] = make_method(cfg).quantize(w, stats).loss
    assert loss["bcq"] < loss["rtn"] and loss["bcq_ef"] < loss["bcq"]


@needs_kernel
@pytest.mark.parametrize("isa", ["avx512_bf16", "avx2"])
def test_the_lut_kernel_runs_the_layer_the_method_made(isa, monkeypatch):
    monkeypatch.setenv("TREEQ_CPU_ISA", isa)
    w = torch.randn(32, 64)
    cfg = treeq.QuantConfig(method="bcq", bits=3, group_size=32)
    result = make_method(cfg).quantize(w, stats_of(torch.randn(64, 64)))
    fmt = LinearFormat(3, 32, True, False, 64, 32, extras="bcq")
    layer = QuantLinear.from_result(fmt, result, torch.randn(32))
    assert torch.equal(layer.effective_weight(), result.weight())
    x = torch.randn(5, 64)
    y = layer(x)
    assert layer.kernel.name == "cpu_lut_bcq"
    torch.testing.assert_close(y, x @ result.weight().T + layer.bias, rtol=1e-5, atol=1e-5)


def test_bits_beyond_four_planes_and_other_grids_are_refused_in_one_line():
    with pytest.raises(TreeqError, match="quantizes to bits 2, 3, 4 only, not 8"):
        treeq.QuantConfig.build(method="bcq", bits=8)
    with pytest.raises(TreeqError, match="grid 'minmax' only"):
        treeq.QuantConfig.build(method="bcq", bits=4, grid="half-step")


@pytest.mark.parametrize("options", [{}, {"error_feedback": True, "offset": False}])
def test_a_bcq_checkpoint_loads_to_what_the_model_computed(options, tmp_path, tokenizer, text_file):
    model = make_model("llama")
    cfg = treeq.QuantConfig(
        method="bcq", bits=3, group_size=32, calib_samples=4, seqlen=32, batch_size=4, options=options
    )
    log = QuantLog(str)
    treeq.quantize(model, cfg, tmp_path / "q", tokenizer=tokenizer, calib_text=str(text_file), log=log)
    assert all(r.extras.startswith("BCQ 3 planes") for r in log.records)
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
    loaded, _ = treeq.load(tmp_path / "q", dtype=torch.float32)
    layers = [m for m in loaded.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.fmt.extras == "bcq" for m in layers)
    with torch.no_grad():
        got = loaded(input_ids=IDS).logits
    if cpu_lut_bcq.unavailable() is None:
        assert {m.kernel.name for m in layers} == {"cpu_lut_bcq"}
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    in_memory = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    for name, layer in loaded.named_modules():
        if isinstance(layer, QuantLinear):
            assert torch.equal(layer.effective_weight(), in_memory[name].effective_weight())
    qcfg = treeq.inspect_checkpoint(tmp_path / "q").quantization
    assert qcfg["quant_method"] == "treeq" and qcfg["weight_extras"] == ["bcq"]


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_every_rows_output_error_is_at_most_rtn_asyms(bits):
    # Inputs with a few loud channels: the fit minimises each group's weight error, which there
    # ranks levels differently from the output error, so without the per-row choice some rows
    # (and modules) end above RTN.
    gen = torch.Generator().manual_seed(5)
    w = torch.distributions.StudentT(4.0).sample((96, 128)) * 0.02
    x = correlated_inputs(128, seed=5) * torch.where(torch.rand(128, generator=gen) < 0.05, 30.0, 1.0)
    stats = stats_of(x)
    rtn = make_method(treeq.QuantConfig(method="rtn", bits=bits, group_size=32, sym=False)).quantize(w, stats)
    result = make_method(treeq.QuantConfig(method="bcq", bits=bits, group_size=32)).quantize(w, stats)
    rtn_rows = row_output_errors(w, rtn.weight(), stats.h)
    assert bool((row_output_errors(w, result.weight(), stats.h) <= rtn_rows).all())
    assert result.loss < rtn.loss
