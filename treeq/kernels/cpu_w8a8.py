"""CPU W8A8 kernel: 8-bit per-row symmetric weights times 8-bit inputs in int8 x int8
(:mod:`.w8a8_vnni`, AVX512-VNNI), for layers whose activation scheme is exactly that.

The layer's GPTQ codes become signed int8 weights (code - 128, the symmetric zero point) once, in
``prepare``. Each call quantizes its input as :func:`treeq.numerics.quantize_activation` does, so
the integers multiplied are those of the fake-quant path; only the float rounding of the epilogue
differs from it. A calibrated (static) per-tensor input scale is applied the same way, to every
token. With an outlier threshold (LLM.int8()) the columns above it in any token are
multiplied in fp32 against their dequantized weight columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import w8a8_vnni
from .w8a8_base import W8A8Kernel, int8_weight, quantized_input


@dataclass
class _W8A8State:
    packed: w8a8_vnni.PackedWeight
    weight: torch.Tensor  # int8 [out, in], for the outlier columns
    scale: torch.Tensor  # fp32 [out]


class CpuW8A8(W8A8Kernel):
    name = "cpu_w8a8"
    priority = 40  # integer inputs: ahead of every weight-only kernel where it applies
    devices = frozenset({"cpu"})
    dtypes = frozenset({torch.bfloat16, torch.float32})
    runs_outlier_columns = True

    @classmethod
    def rejects(cls, fmt, device, dtype) -> str | None:
        return super().rejects(fmt, device, dtype) or w8a8_vnni.available()

    @classmethod
    def prepare(cls, layer) -> None:
        weight = int8_weight(layer)
        layer.kernel_state = _W8A8State(w8a8_vnni.pack_weight(weight), weight, layer.scales[0].float())

    @staticmethod
    def forward(layer, x: torch.Tensor) -> torch.Tensor:
        st: _W8A8State = layer.kernel_state
        x2 = x.reshape(-1, x.shape[-1])
        # The layer's input quantizer decides (and counts) LLM.int8()'s outlier columns.
        mask = layer.input_quantizer.outlier_columns(x2)
        outliers = None if mask is None else mask.nonzero().flatten()
        if outliers is not None and outliers.numel():
            w_outliers = st.weight.index_select(1, outliers).float() * st.scale[:, None]
            y = w8a8_vnni.int8_linear_outliers(x2, outliers, w_outliers, st.packed, st.scale, layer.bias, x.dtype)
        else:
            codes, scale = quantized_input(layer.input_quantizer, x2, w8a8_vnni.quantize_per_token)
            y = w8a8_vnni.int8_linear(codes, scale, st.packed, st.scale, layer.bias, x.dtype)
        return y.reshape(*x.shape[:-1], y.shape[-1])


KERNEL = CpuW8A8
