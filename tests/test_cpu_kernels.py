"""The fused CPU kernels against the reference kernel on the same bf16 inputs."""

import pytest
import torch

from treeq.config import QuantConfig
from treeq.kernels import LinearFormat, cpu_int4_avx512, select_kernel
from treeq.methods import InputStats, make_method
from treeq.quant_linear import QuantLinear


def quant_linear(bits, group_size, sym, desc_act, in_f=256, out_f=96, bias=True, seed=0):
    """A QuantLinear from a real GPTQ run (act-order gives a genuinely permuted g_idx)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=gen) * 0.05
    x = torch.randn(512, in_f, generator=gen) * torch.linspace(0.2, 3, in_f)
    stats = InputStats(in_f, torch.device("cpu"))
    stats.add(x)
    cfg = QuantConfig(method="gptq", bits=bits, group_size=group_size, sym=sym, desc_act=desc_act)
    result = make_method(cfg).quantize(w, stats)
    fmt = LinearFormat(bits, group_size, sym, result.reorders, in_f, out_f)
    b = torch.randn(out_f, generator=gen) if bias else None
    return QuantLinear.from_result(fmt, result, b)


def relative_error(layer, kernel, x):
    """|y_kernel - y_reference| / |y_reference| with both fed the same bf16 input."""
    layer.select_kernel("cpu", torch.float32, "torch")
    ref = layer(x.float())
    layer.select_kernel("cpu", torch.bfloat16, kernel)
    y = layer(x)
    assert y.dtype == torch.bfloat16 and y.shape == ref.shape
    return float((y.float() - ref).norm() / ref.norm())


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size,desc_act", [(32, False), (64, True), (128, True), (-1, False)])
@pytest.mark.parametrize("tokens", [1, 5, 33])
def test_int4_matches_reference_within_bf16(sym, group_size, desc_act, tokens):
    layer = quant_linear(4, group_size, sym, desc_act)
    assert (layer.kernel_state is None) and bool(layer.fmt.desc_act) == desc_act
    x = torch.randn(2, tokens, 256).to(torch.bfloat16)
    assert relative_error(layer, "cpu_int4", x) < 1e-2


def test_int4_act_order_permutation_matters():
    """Dropping the input permutation must break the result, so the test above can fail."""
    layer = quant_linear(4, 64, False, True)
    layer.select_kernel("cpu", torch.bfloat16, "cpu_int4")
    assert layer.kernel_state.perm is not None
    x = torch.randn(3, 256).to(torch.bfloat16)
    good = relative_error(layer, "cpu_int4", x)
    layer.kernel_state.perm = None
    ref = layer.kernel.forward(layer, x).float()
    layer.select_kernel("cpu", torch.float32, "torch")
    assert float((ref - layer(x.float())).norm() / ref.norm()) > 20 * good


@pytest.mark.parametrize("sym", [True, False])
def test_int8_per_row_matches_reference_within_bf16(sym):
    layer = quant_linear(8, -1, sym, False)
    x = torch.randn(4, 7, 256).to(torch.bfloat16)
    assert relative_error(layer, "cpu_int8", x) < 1e-2


def test_selection_on_cpu():
    fmt = LinearFormat(4, 64, False, True, 576, 1536)
    fast = "cpu_int4" if cpu_int4_avx512.library()[0] is None else "cpu_int4_avx512"
    assert select_kernel(fmt, "cpu", torch.bfloat16).name == fast
    assert select_kernel(fmt, "cpu", torch.float32).name == "torch"  # fp32 keeps the exact path
    assert select_kernel(LinearFormat(3, 64, True, False, 576, 1536), "cpu", torch.bfloat16).name == "torch"
    assert select_kernel(LinearFormat(8, -1, True, False, 576, 1536), "cpu", torch.bfloat16).name == "cpu_int8"
    assert select_kernel(LinearFormat(8, 64, True, False, 576, 1536), "cpu", torch.bfloat16).name == "torch"
    odd = LinearFormat(4, 32, True, False, 64, 40)
    from treeq.kernels import explain

    assert explain(odd, "cpu", torch.bfloat16)["cpu_int4"] == "out_features=40 not a multiple of 16"
