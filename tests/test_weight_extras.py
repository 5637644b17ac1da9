"""Weight extras (treeq.extras): tensors a format keeps beside GPTQ's four. A sparse residual is
exact in the weight, the kernel path and a checkpoint; a kind a kernel does not run is refused."""

import pytest
import torch
import torch.nn.functional as F
from conftest import make_model

import treeq
import treeq.extras
from treeq.engine.quant_log import QuantLog
from treeq.extras import WeightExtras
from treeq.extras.sparse_residual import SparseResidual
from treeq.kernels import KERNELS, LinearFormat, explain
from treeq.methods import QuantResult
from treeq.methods.rtn import RTN
from treeq.numerics import dequantize_grouped
from treeq.runtime.quant_linear import QuantLinear

IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))


def with_outliers(result: QuantResult, weight: torch.Tensor, share: float = 0.02) -> QuantResult:
    """``result`` with its largest-magnitude ``share`` of weights moved to a sparse residual: the
    code set to the zero point there, so the dense part is exactly 0."""
    k = max(1, int(share * weight.numel()))
    mask = torch.zeros(weight.numel(), dtype=torch.bool)
    mask[weight.abs().flatten().topk(k).indices] = True
    mask = mask.view_as(weight)
    zero_points = result.zeros.T[torch.arange(weight.shape[0])[:, None], result.g_idx.long()[None]]
    result.codes = torch.where(mask, zero_points.to(torch.uint8), result.codes)
    result.extras = SparseResidual.from_mask(weight, mask)
    return result


def rounded(weight: torch.Tensor) -> QuantResult:
    cfg = treeq.QuantConfig(method="rtn", bits=3, group_size=16, sym=False)
    return RTN(cfg).round(weight)


def test_sparse_residual_is_the_whole_weight_where_kept_and_zero_elsewhere():
    w = torch.randn(64, 64)
    result = with_outliers(rounded(w), w)
    dense = dequantize_grouped(result.codes, result.scales, result.zeros, result.g_idx, result.grid)
    kept = result.extras.add_to(torch.zeros_like(w)) != 0
    assert kept.sum() == result.extras.nnz == int(0.02 * w.numel())
    assert torch.equal(dense[kept], torch.zeros(int(kept.sum())))
    assert torch.equal(result.weight()[kept], w[kept].half().float())
    assert torch.equal(result.weight()[~kept], dense[~kept])


def test_quant_linear_holds_the_extras_and_adds_the_sparse_term_to_the_kernels_output():
    w = torch.randn(64, 64)
    result = with_outliers(rounded(w), w)
    fmt = LinearFormat(bits=3, group_size=16, sym=False, desc_act=False, in_features=64, out_features=64)
    with pytest.raises(ValueError, match="do not match"):
        QuantLinear.from_result(fmt, result, None)
    fmt = LinearFormat(**{**fmt.__dict__, "extras": "sparse_residual"})
    layer = QuantLinear.from_result(fmt, result, torch.randn(64))
    assert {n for n, _ in layer.named_buffers()} - {"bias"} <= set(QuantLinear.QUANTIZED_STATE)
    assert torch.equal(layer.effective_weight(), result.weight())
    assert layer.residual_cols.dtype == torch.int16 and layer.residual_values.dtype == torch.float16
    # Identity input through the kernel selection picks (dense kernel + sparse addmm): exactly W^T.
    assert torch.equal(QuantLinear.from_result(fmt, result, None)(torch.eye(64)), result.weight().T)
    x = torch.randn(3, 5, 64)
    torch.testing.assert_close(layer(x), F.linear(x, result.weight(), layer.bias))
    assert "extras=sparse residual 1.978%" in repr(layer)  # int(0.02 * 4096) = 81 kept


class _Planes(WeightExtras):
    """A stand-in non-additive kind: its weight is a scale times the codes, nothing else."""

    kind = "test_planes"
    names = ("plane_scale",)

    def dequantize(self, codes, scales, zeros, g_idx, grid):
        return codes.float() * self.tensors["plane_scale"].float()[:, None]

    def describe(self, in_features, out_features):
        return "planes"


def test_a_kind_that_replaces_the_dequantization_runs_only_where_a_kernel_declares_it(monkeypatch):
    monkeypatch.setitem(treeq.extras.EXTRAS, _Planes.kind, _Planes)
    fmt = LinearFormat(4, 32, False, False, 64, 32, extras=_Planes.kind)
    reasons = explain(fmt, "cpu", torch.bfloat16)
    assert reasons["torch"] is None
    plain = explain(LinearFormat(4, 32, False, False, 64, 32), "cpu", torch.bfloat16)
    dense = [name for name, k in KERNELS.items() if k.extras is not None and plain[name] is None]
    assert dense and all(reasons[n] == "weight extras 'test_planes' not supported" for n in dense)
    codes = torch.randint(0, 16, (32, 64), dtype=torch.uint8)
    result = QuantResult(
        codes, torch.ones(2, 32).half(), torch.zeros(2, 32, dtype=torch.int32), torch.arange(64) // 32, 0.0
    )
    result.extras = _Planes({"plane_scale": torch.rand(32)})
    layer = QuantLinear.from_result(fmt, result, None)
    assert torch.equal(layer(torch.eye(64)), result.weight().T)
    # An additive kind is run by the dense kernels, whose output QuantLinear adds its term to.
    additive = LinearFormat(4, 32, False, False, 64, 32, extras=SparseResidual.kind)
    assert explain(additive, "cpu", torch.bfloat16) == plain


def quantize_and_load(cfg, tmp_path, tokenizer, text_file):
    """(the quantize log, the loaded checkpoint) of a tiny Llama quantized with ``cfg``, after
    checking that the loaded checkpoint computes the logits the quantized model did."""
    model = make_model("llama")
    log = QuantLog(str)
    treeq.quantize(model, cfg, tmp_path / "q", tokenizer=tokenizer, calib_text=str(text_file), log=log)
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
    loaded, _ = treeq.load(tmp_path / "q")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=IDS).logits, expected, rtol=1e-5, atol=1e-5)
    return log, loaded


def test_a_checkpoint_with_extras_loads_to_what_the_model_computed(tmp_path, tokenizer, text_file, monkeypatch):
    """Through the engine, the writer and the loader, none of which names the kind: RTN made to keep
    its largest weights in a sparse residual."""

    def quantize(self, weight, stats):
        return with_outliers(self.round(weight), weight.float())

    monkeypatch.setattr(RTN, "quantize", quantize)
    monkeypatch.setattr(RTN, "adds_weight_extras", True)
    cfg = treeq.QuantConfig(method="rtn", bits=3, group_size=16, sym=False, calib_samples=4, seqlen=32, batch_size=4)
    log, loaded = quantize_and_load(cfg, tmp_path, tokenizer, text_file)
    assert all(r.extras.startswith("sparse residual") for r in log.records)
    layer = loaded.get_submodule("model.layers.0.mlp.down_proj")
    assert layer.fmt.extras == "sparse_residual" and layer.extras.nnz == int(0.02 * 64 * 128)
    qcfg = treeq.inspect_checkpoint(tmp_path / "q").quantization
    assert qcfg["quant_method"] == "treeq" and qcfg["weight_extras"] == ["sparse_residual"]
    info = treeq.inspect_checkpoint(tmp_path / "q")
    assert info.extras["model.layers.0.mlp.down_proj"] == "sparse residual 1.990%"  # int(0.02 * 8192) = 163
    # 3-bit codes, 3-bit zeros and fp16 scales per 16, int32 g_idx, fp16 + int16 per kept weight, row pointers
    expected_bits = 3 + (3 + 16) / 16 + 32 / 64 + (163 * 32 + 32 * 65) / (64 * 128)
    assert info.bits_per_weight["model.layers.0.mlp.down_proj"] == pytest.approx(expected_bits, rel=1e-3)
