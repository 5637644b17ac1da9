"""CPU kernel for 2- and 3-bit GPTQ-layout layers (SpQR's 3-bit codes in groups of 16, say), which
no fused kernel takes: codes and zero points repacked once as 4-bit words, then ``cpu_int4``'s
long-prompt path at every token count, i.e. blocks of the reference kernel's bf16 weight dequantized
natively (``cpu_dequantize.cpp`` reads g_idx, so any group size and act-order) into oneDNN's layout
and oneDNN's bf16 GEMM. It replaces the reference kernel's per-call fp32 dequantization and
F.linear with the same bf16 weight. fp32 models get ``cpu_int4_fp32``'s path on the same words:
the reference kernel's fp32 weight and product exactly. Memory: the codes are held at 4 bits, not
2 or 3.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .. import packing
from . import cpu_dequantize, cpu_int4, cpu_int4_fp32
from .base import Kernel, matmul_2d
from .blocked_gemm import blocked_gemm


@dataclass
class _Repacked:
    """The layer's tensors as ``cpu_int4.dequantize_rows`` reads a 4-bit layer's."""

    qweight: torch.Tensor  # int32 [in / 8, out]: the codes as 4-bit GPTQ words
    qzeros: torch.Tensor  # int32 [groups, out / 8]
    g_idx: torch.Tensor
    scales: torch.Tensor  # fp32 [groups, out]
    in_features: int
    out_features: int


class CpuLowBit(Kernel):
    name = "cpu_lowbit"
    priority = 10
    bits = frozenset({2, 3})
    devices = frozenset({"cpu"})
    dtypes = frozenset({torch.bfloat16, torch.float16, torch.float32})
    in_multiple = 8  # 4-bit words along the inputs
    out_multiple = 16  # the dequantizer's row blocks (and 4-bit zero-point words)

    @classmethod
    def rejects(cls, fmt, device, dtype):
        return super().rejects(fmt, device, dtype) or cpu_dequantize.unavailable()

    @classmethod
    def prepare(cls, layer) -> None:
        layer.kernel_state = _Repacked(
            qweight=packing.pack(layer.codes().T.contiguous(), 4),
            qzeros=packing.pack(layer.zeros().T.contiguous(), 4).T.contiguous(),
            g_idx=layer.g_idx.to(torch.int32).contiguous(),
            scales=layer.scales.float().contiguous(),
            in_features=layer.in_features,
            out_features=layer.out_features,
        )

    @staticmethod
    def forward(layer, x: torch.Tensor) -> torch.Tensor:
        st: _Repacked = layer.kernel_state
        if x.dtype == torch.float32:
            return cpu_int4_fp32.fp32_gemm(layer, st, x)
        rows = functools.partial(cpu_int4.dequantize_rows, st, st.scales)
        return matmul_2d(layer, x, torch.bfloat16, lambda x2: blocked_gemm(x2, st.out_features, rows))


KERNEL = CpuLowBit
