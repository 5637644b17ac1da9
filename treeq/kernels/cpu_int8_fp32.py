"""CPU kernel for 8-bit GPTQ-layout layers of fp32 models: ``cpu_int4_fp32``'s path on 8-bit words,
the reference kernel's fp32 weight dequantized natively (any group size, act-order included) a block
of output rows at a time, then the same fp32 GEMM.

The reference kernel's per-call torch dequantization took 1.3 ms of a 576 x 576 layer's 3.4 ms at
1024 tokens, against 2.0 ms for the fp32 ``F.linear`` alone (AMX Xeon, 2 threads); evaluation
loads fp32 models by default. Figures: bench/results/kernels.md.
"""

from __future__ import annotations

import torch

from .cpu_int4_fp32 import CpuInt4Fp32, fp32_gemm


class CpuInt8Fp32(CpuInt4Fp32):
    name = "cpu_int8_fp32"
    bits = frozenset({8})
    in_multiple = 8  # inputs in steps of 8: two words of 4 codes

    @staticmethod
    def forward(layer, x: torch.Tensor) -> torch.Tensor:
        return fp32_gemm(layer, layer.kernel_state, x, bits=8)


KERNEL = CpuInt8Fp32
