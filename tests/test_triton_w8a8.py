"""The Triton W8A8 kernel, run by triton's interpreter on CPU tensors: its int32 sums and fp32
epilogue equal the integer reference bit for bit, through a QuantLinear it multiplies exactly the
fake-quant path's integers (dynamic per token and calibrated per tensor), and selection picks it
for such layers on CUDA only."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before the kernels' module is first imported

import pytest
import torch

pytest.importorskip("triton")

from test_cpu_w8a8 import w8a8_layer

from treeq.kernels import explain, select_kernel, triton_w8a8, w8a8_vnni
from treeq.kernels._triton import w8a8
from treeq.numerics import quantize_activation
from treeq.schemes import ActivationScheme

KERNEL = triton_w8a8.KERNEL


@pytest.mark.parametrize("m, n, k, bias", [(5, 40, 100, True), (1, 32, 64, False), (33, 17, 70, True)])
def test_int8_matmul_equals_the_integer_reference_bit_for_bit(m, n, k, bias):
    """Tails in every dimension (masked loads); the epilogue's order is the reference's."""
    gen = torch.Generator().manual_seed(m + n + k)
    codes, scale, _ = quantize_activation(torch.randn(m, k, generator=gen), 8)
    w = torch.randint(-127, 128, (n, k), generator=gen).to(torch.int8)
    w_scale, b = torch.rand(n, generator=gen) / 100, torch.randn(n, generator=gen) if bias else None
    expected = w8a8_vnni.int8_linear_reference(codes, scale, w, w_scale, b, torch.float32)
    assert torch.equal(w8a8.int8_linear(codes, scale, w, w_scale, b), expected)


@pytest.mark.parametrize(
    "activation",
    [ActivationScheme(bits=8), ActivationScheme(bits=8, granularity="per-tensor", dynamic=False)],
    ids=["dynamic-per-token", "static-per-tensor"],
)
def test_quant_linear_multiplies_the_fake_quant_integers(activation):
    layer, result = w8a8_layer(activation)
    if not activation.dynamic:
        layer.input_quantizer.calibrate(torch.full((96,), -2.0), torch.full((96,), 2.0))
    layer.kernel = KERNEL
    KERNEL.prepare(layer)
    x = torch.randn(2, 3, 96, generator=torch.Generator().manual_seed(1))
    fake = layer.input_quantizer(x) @ result.weight().T + layer.bias
    y = layer(x)
    torch.testing.assert_close(y, fake, rtol=1e-5, atol=1e-5)
    x2 = x.reshape(6, 96)
    codes = (layer.input_quantizer(x2) / _scales(layer, x2)[:, None]).round().to(torch.int8)
    w_int8 = (result.codes.to(torch.int16) - 128).to(torch.int8)
    reference = w8a8_vnni.int8_linear_reference(
        codes, _scales(layer, x2), w_int8, layer.scales[0].float(), layer.bias, torch.float32
    )
    assert torch.equal(y.reshape(6, -1), reference)


def _scales(layer, x):
    q = layer.input_quantizer
    return quantize_activation(x, 8)[1] if q.scheme.dynamic else q.scale.expand(x.shape[0])


def test_selected_for_w8a8_layers_on_cuda_only():
    layer, _ = w8a8_layer(ActivationScheme(bits=8))
    assert select_kernel(layer.fmt, "cuda", torch.float16) is KERNEL
    assert select_kernel(layer.fmt, "cpu", torch.float32) is not KERNEL
    outliers, _ = w8a8_layer(ActivationScheme(bits=8, outlier_threshold=6.0))
    assert "no outlier columns" in explain(outliers.fmt, "cuda", torch.float16)[KERNEL.name]
    weight_only, _ = w8a8_layer(None)
    assert "weight-only layer" in explain(weight_only.fmt, "cuda", torch.float16)[KERNEL.name]
