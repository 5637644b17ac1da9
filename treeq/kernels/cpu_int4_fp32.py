"""CPU kernel for 4-bit GPTQ-layout layers of fp32 models: the reference kernel's own fp32 weight,
dequantized natively (``cpu_dequantize.cpp``: (code - zero) * scale in fp32 as the numerics module
computes it; any group size, act-order included) a block of output rows at a time, then the fp32
GEMM the reference kernel runs (:mod:`.blocked_gemm`).

The reference kernel unpacks and dequantizes through a chain of torch ops at every call, which on
SmolLM2-135M was 0.57 s of a quantized fp32 forward over 1024 tokens that took 2.26 s, against
1.46 s for the fp model (AMX Xeon, 2 threads). Evaluation loads models in fp32 by default, so
perplexity runs this. Figures: bench/results/kernels.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import cpu_dequantize
from .base import Kernel, matmul_2d
from .blocked_gemm import blocked_gemm


@dataclass
class _State:
    qweight: torch.Tensor  # int32 [in / 8, out], the checkpoint's
    qzeros: torch.Tensor  # int32 [groups, out / 8]
    scales: torch.Tensor  # fp32 [groups, out], the checkpoint's fp16 ones exactly
    g_idx: torch.Tensor  # int32 [in]
    in_features: int
    out_features: int


def dequantize_rows(st, lo: int, hi: int, address: int, bits: int = 4) -> None:
    """Output rows lo..hi of the reference kernel's fp32 weight at ``address``, [hi - lo, in]; ``st``
    holds ``bits``-bit GPTQ words (``qweight``, ``qzeros``; 4 or 8 bits), fp32 ``scales`` and int32
    ``g_idx``, as this kernel's state, ``cpu_int8_fp32``'s and ``cpu_lowbit``'s (2- and 3-bit codes
    repacked in 4-bit words) do."""
    cpu_dequantize.functions(CpuInt4Fp32.name).treeq_gptq_dequantize_fp32(
        st.qweight.data_ptr(), st.qzeros.data_ptr(), st.scales.data_ptr(), st.g_idx.data_ptr(),
        st.in_features, st.out_features, lo, hi, address, bits, torch.get_num_threads(),
    )  # fmt: skip


def fp32_gemm(layer, st, x: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """``layer``'s output for fp32 ``x``, its weight dequantized from ``st`` (``bits``-bit words) a
    block of rows at a time, the bias added within the GEMM as the reference kernel's F.linear
    adds it."""

    def rows(lo: int, hi: int, address: int, _layout: int) -> None:  # fp32 blocks are always rows
        dequantize_rows(st, lo, hi, address, bits)

    def gemm(x2: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return blocked_gemm(x2, st.out_features, rows, bias=bias)

    return matmul_2d(layer, x, torch.float32, gemm, bias_in_product=True)


class CpuInt4Fp32(Kernel):
    name = "cpu_int4_fp32"
    priority = 10  # above the reference kernel, whose weight and product it computes
    bits = frozenset({4})
    devices = frozenset({"cpu"})
    dtypes = frozenset({torch.float32})
    in_multiple = 8  # 8 codes per word along the inputs
    out_multiple = 16  # the dequantizer's blocks of output rows

    @classmethod
    def rejects(cls, fmt, device, dtype):
        return super().rejects(fmt, device, dtype) or cpu_dequantize.unavailable()

    @classmethod
    def prepare(cls, layer) -> None:
        layer.kernel_state = _State(
            qweight=layer.qweight.contiguous(),
            qzeros=layer.qzeros.contiguous(),
            scales=layer.scales.float().contiguous(),
            g_idx=layer.g_idx.to(torch.int32).contiguous(),
            in_features=layer.in_features,
            out_features=layer.out_features,
        )

    @staticmethod
    def forward(layer, x: torch.Tensor) -> torch.Tensor:
        return fp32_gemm(layer, layer.kernel_state, x)


KERNEL = CpuInt4Fp32
