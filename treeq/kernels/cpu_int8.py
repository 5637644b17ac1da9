"""CPU 8-bit kernel for per-row groups: torch's fused int8-weight matmul (`_weight_int8pack_mm`).

The op computes x @ (w8 * scale)^T with signed int8 w8 and one bf16 scale per output row. GPTQ's
unsigned codes become w8 = code - 128; an asymmetric zero point z adds (128 - z) * scale times the
row sum of x, a rank-one correction computed alongside.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Kernel, matmul_2d


@dataclass
class _Int8State:
    weight: torch.Tensor  # int8 [out, in]
    scale: torch.Tensor  # bf16 [out]
    offset: torch.Tensor | None  # bf16 [out]: (128 - zero) * scale, None when symmetric


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
        scale, zero = layer.scales.float()[0], layer.zeros().float()[0]
        offset = (128 - zero) * scale
        layer.kernel_state = _Int8State(
            weight=(codes - 128).to(torch.int8).contiguous(),
            scale=scale.to(torch.bfloat16),
            offset=None if bool((zero == 128).all()) else offset.to(torch.bfloat16),
        )

    @staticmethod
    def forward(layer, x: torch.Tensor) -> torch.Tensor:
        st: _Int8State = layer.kernel_state

        def matmul(x2):
            y = torch._weight_int8pack_mm(x2, st.weight, st.scale)
            if st.offset is not None:
                y = y + x2.sum(dim=1, keepdim=True) * st.offset
            return y

        return matmul_2d(layer, x, torch.bfloat16, matmul)


KERNEL = CpuInt8
