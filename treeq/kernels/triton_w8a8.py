"""Triton W8A8 for CUDA: the layer's input quantized to int8 per token (or on its calibrated
per-tensor scale) exactly as the fake-quant path does (:mod:`treeq.numerics`), then int8 x int8
with int32 sums and the fp32 epilogue in Triton (:mod:`._triton.w8a8`). LLM.int8()'s outlier
columns are left to the fake-quant path."""

from __future__ import annotations

import importlib.util

import torch

from .. import numerics
from .w8a8_base import W8A8Kernel, int8_weight, quantized_input


def _per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    codes, scale, _ = numerics.quantize_activation(x, 8)
    return codes, scale


class TritonW8A8(W8A8Kernel):
    name = "triton-w8a8"
    priority = 40  # integer inputs: ahead of every weight-only kernel where it applies
    devices = frozenset({"cuda"})
    dtypes = frozenset({torch.float16, torch.bfloat16, torch.float32})

    @classmethod
    def rejects(cls, fmt, device, dtype) -> str | None:
        reason = super().rejects(fmt, device, dtype)
        if reason is None and importlib.util.find_spec("triton") is None:
            return "triton is not installed (pip install 'treeq[triton]')"
        return reason

    @classmethod
    def prepare(cls, layer) -> None:
        layer.kernel_state = (int8_weight(layer), layer.scales[0].float())

    @staticmethod
    def forward(layer, x: torch.Tensor) -> torch.Tensor:
        from ._triton import w8a8

        weight, scale = layer.kernel_state
        x2 = x.reshape(-1, x.shape[-1])
        codes, x_scale = quantized_input(layer.input_quantizer, x2, _per_token)
        with torch.cuda.device_of(x):
            y = w8a8.int8_linear(codes, x_scale, weight, scale, layer.bias, x.dtype)
        return y.reshape(*x.shape[:-1], y.shape[-1])


KERNEL = TritonW8A8
