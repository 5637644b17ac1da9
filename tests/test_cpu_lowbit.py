"""cpu_lowbit: 2- and 3-bit layers through the native dequantizer and oneDNN's bf16 GEMM compute
with exactly the reference kernel's bf16 weight, act-order and groups of 16 included; in fp32 models
they give the reference kernel's output exactly."""

import pytest
import torch
import torch.nn.functional as F

import treeq
from treeq.kernels import KERNELS, LinearFormat, cpu_dequantize, explain
from treeq.methods import make_method
from treeq.runtime.quant_linear import QuantLinear

pytestmark = pytest.mark.skipif(not cpu_dequantize.available(), reason="no native dequantizer on this machine")


def layer(method: str, bits: int, group_size: int, n: int = 256) -> QuantLinear:
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(n, n, generator=g) * 0.02
    m = make_method(treeq.QuantConfig(method=method, bits=bits, group_size=group_size, sym=False))
    stats = m.stats(n, torch.device("cpu"))
    stats.add(torch.randn(64, n, generator=g) * torch.rand(n, generator=g))
    result = m.quantize(w, stats)
    kind = None if result.extras is None else result.extras.kind
    q = QuantLinear.from_result(LinearFormat(bits, group_size, False, result.reorders, n, n, extras=kind), result, None)
    q.select_kernel("cpu", torch.bfloat16)
    return q


@pytest.mark.parametrize("method,bits,group_size", [("spqr", 3, 16), ("gptq", 2, 32), ("rtn", 3, -1)])
def test_the_gemm_runs_the_reference_kernels_bf16_weight(method, bits, group_size):
    q = layer(method, bits, group_size)
    assert q.kernel.name == "cpu_lowbit"
    if method == "spqr":
        assert q.fmt.desc_act and q.extras.nnz > 0
    eye = torch.eye(q.in_features, dtype=torch.bfloat16)
    # One-hot inputs pick out columns: the kernel's weight, then QuantLinear's sparse term, exactly.
    assert torch.equal(q.kernel.forward(q, eye), q.dequantized_weight(additive=False).to(torch.bfloat16).T)
    assert torch.equal(q(eye), q.effective_weight().to(torch.bfloat16).T)
    x = torch.randn(5, q.in_features, dtype=torch.bfloat16)
    torch.testing.assert_close(q(x).float(), F.linear(x.float(), q.effective_weight()), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("method,bits,group_size", [("spqr", 3, 16), ("gptq", 2, 32), ("rtn", 3, -1)])
def test_fp32_models_get_the_reference_kernels_output_exactly(method, bits, group_size):
    # Checked to fail with zero + 1 in cpu_dequantize.cpp's gptq4_dequantize.
    q = layer(method, bits, group_size)
    x = torch.randn(2, 7, q.in_features)
    q.select_kernel("cpu", torch.float32, "torch")
    reference = q(x)
    q.select_kernel("cpu", torch.float32)
    assert q.kernel.name == "cpu_lowbit" and torch.equal(q(x), reference)


def test_it_declines_what_others_run():
    reasons = explain(LinearFormat(4, 32, False, False, 256, 256), "cpu", torch.bfloat16)
    assert reasons["cpu_lowbit"] == "bits=4 not in [2, 3]"
    fp32 = explain(LinearFormat(3, 16, False, True, 256, 256), "cpu", torch.float32)
    assert fp32["cpu_lowbit"] is None and fp32["cpu_int4_fp32"] == "bits=3 not in [4]"
    assert KERNELS["cpu_lowbit"].priority > KERNELS["torch"].priority
