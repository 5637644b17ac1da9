"""CPU 8-bit kernel for per-row groups: torch's fused int8-weight matmul (`_weight_int8pack_mm`),
and from ``GEMM_FROM`` tokens on a bf16 GEMM over blocks of the reference kernel's own dequantized
weight (:mod:`.blocked_gemm`).

The op computes x @ (w8 * scale)^T with signed int8 w8 and one bf16 scale per output row. GPTQ's
unsigned codes become w8 = code - 128; an asymmetric zero point z adds (128 - z) * scale times the
row sum of x, a rank-one correction computed alongside in fp32. The GEMM path dequantizes the same
w8 with the checkpoint's fp16 scale in fp32, as the reference kernel does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import cpu_dequantize, cpu_isa
from .base import Kernel, matmul_2d
from .blocked_gemm import blocked_gemm

# The op falls behind bf16 from 8 tokens (0.25x from 256 on a 4096-wide layer); the blocked GEMM
# (its dequantization costing about as much as 25 tokens of bf16 GEMM) against it on a Zen 5 (one
# core, thread CPU time, 10 interleaved runs): 0.52 / 0.62x bf16 at 16 tokens, 0.56 / 0.50x at 24.
# Only where the CPU multiplies bf16 in hardware: elsewhere oneDNN emulates the bf16 GEMM, and on an
# AMX Xeon standing in for such CPUs (oneDNN and ATen capped at AVX2, then at AVX512 without BF16;
# 2048 x 2048, 1 and 2 threads) the op ran at 2.2-3.0x bf16 from 16 to 1024 tokens, the GEMM at
# 0.86-1.0x. Read at each call, so tests can force either path.
GEMM_FROM = 24


def path(tokens: int, native_bf16: bool) -> str:
    """The path a call with ``tokens`` rows takes: "op" or "gemm" (only where ``native_bf16``:
    :func:`.cpu_isa.native_bf16` when the kernel was chosen)."""
    return "gemm" if native_bf16 and tokens >= GEMM_FROM and cpu_dequantize.available() else "op"


@dataclass
class _Int8State:
    weight: torch.Tensor  # int8 [out, in]
    scale: torch.Tensor  # bf16 [out], the op's
    offset: torch.Tensor | None  # fp32 [out]: (128 - zero) * scale, None when symmetric
    scale32: torch.Tensor  # fp32 [out], the checkpoint's, for the GEMM path
    zero: torch.Tensor  # int32 [out]
    native_bf16: bool  # cpu_isa.native_bf16() when the kernel was chosen: whether the GEMM path may run


def dequantize_rows(st: _Int8State, lo: int, hi: int, address: int) -> None:
    """Output rows lo..hi of the reference kernel's weight in bf16 at ``address``, [hi - lo, in]."""
    cpu_dequantize.functions("cpu_int8").treeq_int8_dequantize(
        st.weight.data_ptr(), st.scale32.data_ptr(), st.zero.data_ptr(), st.weight.shape[1], lo, hi, address,
        torch.get_num_threads(),
    )  # fmt: skip


class CpuInt8(Kernel):
    name = "cpu_int8"
    priority = 20
    bits = frozenset({8})
    group_sizes = frozenset({-1})  # the op has one scale per row
    devices = frozenset({"cpu"})
    dtypes = frozenset({torch.bfloat16, torch.float16})

    @classmethod
    def prepare(cls, layer) -> None:
        codes = layer.codes().to(torch.int16)
        scale, zero = layer.scales.float()[0], layer.zeros()[0]
        offset = (128 - zero.float()) * scale
        layer.kernel_state = _Int8State(
            weight=(codes - 128).to(torch.int8).contiguous(),
            scale=scale.to(torch.bfloat16),
            offset=None if bool((zero == 128).all()) else offset,
            scale32=scale.contiguous(),
            zero=zero.to(torch.int32).contiguous(),
            native_bf16=cpu_isa.native_bf16(),
        )

    @staticmethod
    def forward(layer, x: torch.Tensor) -> torch.Tensor:
        st: _Int8State = layer.kernel_state
        return matmul_2d(layer, x, torch.bfloat16, lambda x2: matmul(st, x2))


def op_matmul(st: _Int8State, x2: torch.Tensor) -> torch.Tensor:
    """[M, out] = bf16 x2 [M, in] times the weight by torch's int8-weight op."""
    y = torch._weight_int8pack_mm(x2, st.weight, st.scale)
    if st.offset is not None:
        # In fp32, rounded once with the op's product: in bf16 (the row sums, their product and the
        # sum each rounded) it doubled the op's error where zero points sit far from 128.
        y = torch.addr(y.float(), x2.sum(dim=1, dtype=torch.float32), st.offset).to(torch.bfloat16)
    return y


def gemm_matmul(st: _Int8State, x2: torch.Tensor) -> torch.Tensor:
    """The same product by the bf16 GEMM on the reference kernel's weight, a block of rows at a time."""

    def rows(lo, hi, address, _layout):  # always PLAIN (onednn=False): cpu_dequantize.cpp says why
        dequantize_rows(st, lo, hi, address)

    return blocked_gemm(x2, st.weight.shape[0], rows, onednn=False)


def matmul(st: _Int8State, x2: torch.Tensor) -> torch.Tensor:
    """The op, or the GEMM path from ``GEMM_FROM`` tokens (:func:`path`)."""
    return gemm_matmul(st, x2) if path(x2.shape[0], st.native_bf16) == "gemm" else op_matmul(st, x2)


KERNEL = CpuInt8
