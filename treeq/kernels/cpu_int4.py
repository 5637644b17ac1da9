"""CPU 4-bit kernel: torch's fused int4 matmul (`_weight_int4pack_mm_for_cpu`) in bf16.

The GPTQ layout is repacked once when the kernel is chosen. The fused op computes
w = (q - 8) * scale + offset per group with bf16 scale and offset, so GPTQ's (q - zero) * scale
maps to offset = (8 - zero) * scale; asymmetric zero points cost nothing. Act-order checkpoints
have their input channels permuted once here (and each input permuted the same way), which makes
every group a contiguous run as the fused op requires. Per-row groups become groups of the largest
size the op takes that divides in_features, each carrying the row's scale.

The op's cost grows with the tokens much faster than a GEMM's, so from ``GEMM_FROM`` tokens on the
layer runs as a bf16 GEMM over blocks of the reference kernel's own dequantized weight instead, where
the CPU multiplies bf16 in hardware. Where it does not (AVX2 only, or AVX512 without BF16), oneDNN
emulates the bf16 GEMM and the op is ahead at every token count: on an AMX Xeon standing in for such
CPUs (oneDNN and ATen capped at AVX2, then at AVX512 without BF16; 2048 x 2048, 1 and 2 threads)
the op ran at 2.2-3.1x bf16 from 16 to 1024 tokens, the GEMM at 0.79-0.99x.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from . import cpu_dequantize, cpu_isa
from .base import Kernel, grouped_codes, matmul_2d
from .blocked_gemm import blocked_gemm

OP_GROUP_SIZES = (256, 128, 64, 32)
INNER_K_TILES = 2
# The op fell behind bf16 from 16 tokens on a 4096-wide layer and stays at ~0.4x beyond; the blocked
# GEMM (its portable dequantization costing about as much as 40 tokens of bf16 GEMM) against it on a
# Zen 5 (one core, thread CPU time, 10 interleaved runs): 0.50 / 0.62x bf16 at 32 tokens, 0.59 /
# 0.46x at 64. Read at each call, so tests can force either path.
GEMM_FROM = 64


def path(tokens: int, native_bf16: bool) -> str:
    """The path a call with ``tokens`` rows takes: "op" or "gemm" (only where ``native_bf16``:
    :func:`.cpu_isa.native_bf16` when the kernel was chosen)."""
    return "gemm" if native_bf16 and tokens >= GEMM_FROM and cpu_dequantize.available() else "op"


def dequantize_rows(layer, scales: torch.Tensor, lo: int, hi: int, address: int, layout: int) -> None:
    """Output rows lo..hi of the reference kernel's weight in bf16 at ``address``, in a
    :mod:`.blocked_gemm` layout; ``scales``: the checkpoint's, in fp32."""
    qweight, qzeros, g_idx = (t.contiguous() for t in (layer.qweight, layer.qzeros, layer.g_idx))
    cpu_dequantize.functions("cpu_int4").treeq_gptq4_dequantize(
        qweight.data_ptr(), qzeros.data_ptr(), scales.data_ptr(), g_idx.data_ptr(),
        layer.in_features, layer.out_features, lo, hi, address, layout, torch.get_num_threads(),
    )  # fmt: skip


@dataclass
class _Int4State:
    packed: torch.Tensor  # uint8, the op's own layout
    scale_offset: torch.Tensor  # bf16 [groups, out, 2]
    group_size: int
    perm: torch.Tensor | None  # input-channel order that makes groups contiguous (act-order)
    native_bf16: bool  # cpu_isa.native_bf16() when the kernel was chosen: whether the GEMM path may run


class CpuInt4(Kernel):
    name = "cpu_int4"
    priority = 20
    bits = frozenset({4})
    group_sizes = frozenset({-1, *OP_GROUP_SIZES})
    devices = frozenset({"cpu"})
    # fp32 models keep the exact reference kernel; the fused op computes in bf16.
    dtypes = frozenset({torch.bfloat16, torch.float16})
    in_multiple = 32
    out_multiple = 16

    @classmethod
    def prepare(cls, layer) -> None:
        k = layer.in_features
        codes, perm, gs = grouped_codes(layer, cls.name)
        scales, zeros = layer.scales.float(), layer.zeros().float()  # [groups, out]
        op_gs = gs if gs in OP_GROUP_SIZES else next(g for g in OP_GROUP_SIZES if k % g == 0)
        repeat = gs // op_gs
        scale_offset = torch.stack([scales, (8 - zeros) * scales], dim=-1).repeat_interleave(repeat, dim=0)
        layer.kernel_state = _Int4State(
            packed=torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), INNER_K_TILES),
            scale_offset=scale_offset.to(torch.bfloat16).contiguous(),
            group_size=op_gs,
            perm=perm,
            native_bf16=cpu_isa.native_bf16(),
        )

    @staticmethod
    def forward(layer, x: torch.Tensor) -> torch.Tensor:
        st: _Int4State = layer.kernel_state

        def matmul(x2):
            return torch._weight_int4pack_mm_for_cpu(x2, st.packed, st.group_size, st.scale_offset)

        def gemm(x2):
            scales = layer.scales.float()
            return blocked_gemm(x2, layer.out_features, functools.partial(dequantize_rows, layer, scales))

        # The GEMM takes inputs in the checkpoint's channel order: no permutation.
        if path(x.numel() // x.shape[-1], st.native_bf16) == "gemm":
            return matmul_2d(layer, x, torch.bfloat16, gemm)
        return matmul_2d(layer, x, torch.bfloat16, matmul, st.perm)


KERNEL = CpuInt4
