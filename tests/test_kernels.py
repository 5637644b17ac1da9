import pytest
import torch

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
