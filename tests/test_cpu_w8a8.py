"""The W8A8 kernel as a QuantLinear runs it: chosen only for layers with 8-bit per-token inputs,
multiplying exactly the integers the fake-quant path uses, with LLM.int8()'s outlier columns, and
declining (weight-only kernel + fake-quant) where the CPU lacks AVX512-VNNI."""

import pytest
import torch

import treeq
from treeq.kernels import KERNELS, cpu_isa, w8a8_vnni
from treeq.methods import InputStats, make_method
from treeq.numerics import quantize_activation
from treeq.runtime.quant_linear import QuantLinear
from treeq.schemes import ActivationScheme
from treeq.storage.checkpoint import linear_format

needs_vnni = pytest.mark.skipif(w8a8_vnni.available() is not None, reason=f"{w8a8_vnni.available()}")


def w8a8_layer(activation, seed=0, n=48, k=96):
    gen = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(k, n)
    linear.weight.data = torch.randn(n, k, generator=gen) * 0.05
    cfg = treeq.QuantConfig(method="rtn", bits=8, group_size=-1)
    result = make_method(cfg).quantize(linear.weight.data, InputStats(k, torch.device("cpu")))
    fmt = linear_format(cfg.weights, linear, False, True, activation)
    return QuantLinear.from_result(fmt, result, linear.bias), result


@needs_vnni
def test_multiplies_the_fake_quant_integers_exactly():
    """The output equals the integer reference on the same codes bit for bit, and the fake-quant
    matmul up to the epilogue's rounding. Checked failing with the zero point not subtracted."""
    layer, result = w8a8_layer(ActivationScheme(bits=8))
    layer.select_kernel("cpu", torch.float32)
    assert layer.kernel.name == "cpu_w8a8"
    x = torch.randn(5, 96, generator=torch.Generator().manual_seed(1))
    codes, scale, _ = quantize_activation(x, 8)
    w_int8 = (result.codes.to(torch.int16) - result.zeros[0].to(torch.int16)[:, None]).to(torch.int8)
    reference = w8a8_vnni.int8_linear_reference(
        codes, scale, w_int8, layer.scales[0].float(), layer.bias, torch.float32
    )
    assert torch.equal(layer(x), reference)
    fake = layer.input_quantizer(x) @ result.weight().T + layer.bias
    torch.testing.assert_close(layer(x), fake, rtol=1e-5, atol=1e-5)


@needs_vnni
def test_static_per_tensor_inputs_multiply_the_fake_quant_integers():
    """Calibrated levels: every token takes the layer's one scale, values beyond it clamp; the
    kernel multiplies exactly the fake-quant path's integers."""
    layer, result = w8a8_layer(ActivationScheme(bits=8, granularity="per-tensor", dynamic=False))
    layer.input_quantizer.calibrate(torch.full((96,), -1.5), torch.full((96,), 2.0))
    layer.select_kernel("cpu", torch.float32)
    assert layer.kernel.name == "cpu_w8a8"
    x = torch.randn(5, 96, generator=torch.Generator().manual_seed(1)) * 2
    codes = (layer.input_quantizer(x) / layer.input_quantizer.scale).round().to(torch.int8)
    w_int8 = (result.codes.to(torch.int16) - result.zeros[0].to(torch.int16)[:, None]).to(torch.int8)
    reference = w8a8_vnni.int8_linear_reference(
        codes, layer.input_quantizer.scale.expand(5), w_int8, layer.scales[0].float(), layer.bias, torch.float32
    )
    assert torch.equal(layer(x), reference)


@needs_vnni
def test_outlier_columns_run_in_full_precision():
    layer, result = w8a8_layer(ActivationScheme(bits=8, outlier_threshold=6.0))
    layer.select_kernel("cpu", torch.float32)
    x = torch.randn(4, 96, generator=torch.Generator().manual_seed(2))
    x[1, 10] = 30.0
    y = layer(x)
    assert layer.input_quantizer.outlier_share == pytest.approx(1 / 96)  # counted on the kernel's path too
    fake = layer.input_quantizer(x) @ result.weight().T + layer.bias
    torch.testing.assert_close(y, fake, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "activation, reason",
    [
        (None, "weight-only layer"),
        (ActivationScheme(bits=6), "activations 6-bit per-token sym dynamic"),
        (ActivationScheme(bits=8, granularity="per-group", group_size=32, dynamic=False), "per-group of 32 sym static"),
    ],
)
def test_refuses_layers_it_does_not_implement(activation, reason):
    layer, _ = w8a8_layer(activation)
    assert reason in KERNELS["cpu_w8a8"].rejects(layer.fmt, "cpu", torch.float32)


def test_without_vnni_a_weight_only_kernel_runs_the_fake_quant_inputs(monkeypatch):
    """An AVX2-only CPU (TREEQ_CPU_ISA=avx2): the kernel declines with the reason, and the layer
    still computes the fake-quant W8A8 output."""
    monkeypatch.setenv(cpu_isa.ENV, "avx2")
    layer, result = w8a8_layer(ActivationScheme(bits=8))
    assert "TREEQ_CPU_ISA=avx2" in KERNELS["cpu_w8a8"].rejects(layer.fmt, "cpu", torch.float32)
    layer.select_kernel("cpu", torch.float32)
    assert layer.kernel.name != "cpu_w8a8"
    x = torch.randn(3, 96, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(layer(x), layer.input_quantizer(x) @ result.weight().T + layer.bias)
