import pytest
import torch
from test_cpu_kernels import quant_linear

import treeq.kernels as kernels
from treeq.errors import TreeqError
from treeq.kernels import Kernel, LinearFormat, explain, select_kernel

# 5-bit: no kernel but the reference runs it on CPU (cpu_lowbit takes 2 and 3 bits, in fp32 too).
FMT = LinearFormat(bits=5, group_size=64, sym=False, desc_act=True, in_features=128, out_features=64)


class Int4Only(Kernel):
    name = "int4-only"
    priority = 100  # above every real kernel
    bits = frozenset({4})
    devices = frozenset({"cpu"})
    supports_desc_act = False

    @staticmethod
    def forward(layer, x):
        raise AssertionError("never selected in these tests")


def test_reference_kernel_runs_every_format():
    assert select_kernel(FMT, "cpu", torch.float32).name == "torch"


def test_capabilities_give_reasons():
    assert Int4Only.rejects(FMT, "cpu", torch.float32) == "bits=5 not in [4]"
    fmt4 = LinearFormat(4, 64, True, True, 128, 64)
    assert Int4Only.rejects(fmt4, "cpu", torch.float32) == "act-order (g_idx) not supported"
    assert "device cuda" in Int4Only.rejects(LinearFormat(4, 64, True, False, 128, 64), "cuda", torch.float32)


def test_priority_picks_the_best_fitting_kernel(monkeypatch):
    monkeypatch.setitem(kernels.KERNELS, Int4Only.name, Int4Only)
    fits = LinearFormat(4, 64, True, False, 128, 64)
    assert select_kernel(fits, "cpu", torch.float32) is Int4Only
    assert select_kernel(FMT, "cpu", torch.float32).name == "torch"
    assert explain(FMT, "cpu", torch.float32)["int4-only"] == "bits=5 not in [4]"


def test_nothing_fits_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(kernels, "KERNELS", {Int4Only.name: Int4Only})
    with pytest.raises(TreeqError, match="no kernel can run .* int4-only: bits=5 not in"):
        select_kernel(FMT, "cpu", torch.float32)


def test_forcing_an_unfit_kernel_says_why(monkeypatch):
    monkeypatch.setitem(kernels.KERNELS, Int4Only.name, Int4Only)
    with pytest.raises(TreeqError, match="kernel 'int4-only' cannot run this layer: bits=5"):
        select_kernel(FMT, "cpu", torch.float32, force="int4-only")
    with pytest.raises(TreeqError, match="unknown kernel 'nope'"):
        select_kernel(FMT, "cpu", torch.float32, force="nope")


def test_quantized_state_names_every_buffer_but_bias():
    """inspect counts a checkpoint's fp16-equivalent size from this list; a new buffer must join it."""
    from treeq.extras import EXTRAS
    from treeq.runtime.input_transform import InputTransform
    from treeq.runtime.quant_linear import QuantLinear

    transform = InputTransform.stored_for("m", {"m.channel_scales": 0, "m.pairs": torch.zeros(2, 64)}, None, 64, 32)
    names = set()
    for kind in EXTRAS.values():  # one layer per kind of weight extras, each with every buffer it may hold
        fmt = LinearFormat(4, 32, True, False, in_features=64, out_features=32, extras=kind.kind)
        layer = QuantLinear(fmt, bias=True, transform=transform, extras=kind({n: torch.zeros(1) for n in kind.names}))
        names |= {n for n, _ in layer.named_buffers()} - {"bias"}
    assert names == set(QuantLinear.QUANTIZED_STATE)


def layer_on(bits: int, dtype: torch.dtype, kernel: str):
    """A 48 x 64 asymmetric layer (groups of 32, or one per row at 8 bits) on ``kernel``."""
    layer = quant_linear(bits, 32 if bits < 8 else -1, False, False, in_f=64, out_f=48, bias=False)
    layer.select_kernel("cpu", dtype, kernel)
    return layer


def cpu_kernel_cases():
    """(bits, dtype, kernel) for each CPU kernel that takes :func:`layer_on`'s layer here."""
    for bits in (2, 4, 8):
        for dtype in (torch.bfloat16, torch.float32):
            fmt = LinearFormat(bits, 32 if bits < 8 else -1, False, False, 64, 48)
            for name, reason in explain(fmt, "cpu", dtype).items():
                if reason is None:
                    yield pytest.param(bits, dtype, name, id=f"{name}-{bits}bit-{str(dtype)[6:]}")


@pytest.mark.parametrize("bits,dtype,kernel", list(cpu_kernel_cases()))
def test_every_kernel_refuses_an_input_of_the_wrong_width(bits, dtype, kernel):
    # The native kernels took the width from the layer and the token count from x.numel(): a wider
    # input wrote past the output buffer (glibc aborted), a narrower one returned garbage.
    layer = layer_on(bits, dtype, kernel)
    for width in (32, 128):
        with pytest.raises(RuntimeError, match=f"input of shape \\(4, {width}\\) to a quantized linear of 64 inputs"):
            layer(torch.randn(4, width).to(dtype))


@pytest.mark.parametrize("bits,dtype,kernel", list(cpu_kernel_cases()))
def test_every_kernel_takes_slices_and_transposed_views(bits, dtype, kernel):
    # The fused ops below a few dozen tokens (cpu_int4, cpu_int8, cpu_int8_avx512's op) need rows
    # laid out in order; a slice of a wider tensor or a transposed view raised inside torch.
    layer = layer_on(bits, dtype, kernel)
    wide = torch.randn(2, 5, 128, generator=torch.Generator().manual_seed(1)).to(dtype)
    for x in (wide[..., :64], wide[0, :, ::2], wide[0, :, :64].T.contiguous().T):
        with torch.no_grad():
            assert torch.equal(layer(x), layer(x.contiguous()))
