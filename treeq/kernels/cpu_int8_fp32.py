"""CPU kernel for 8-bit GPTQ-layout layers of fp32 models: ``cpu_int4_fp32``'s path on 8-bit words,
the reference kernel's fp32 weight dequantized natively (any group size, act-order included) a block
of output rows at a time, then the same fp32 GEMM.

The reference kernel dequantizes through torch ops at every call, which cost 8-bit layers of fp32
models most of the time of the product itself; evaluation loads fp32 models by default. Figures:
bench/results/kernels.md.
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
