"""Triton dequantize-matmul for GPTQ-format weights on CUDA: every bit width, group size and
act-order, reading the checkpoint layout as stored (no repacking at load)."""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from .base import Kernel, LinearFormat

# From this many rows on, dequantizing the weight once and running a dense GEMM does less work
# than the fused kernel, which re-dequantizes every weight tile for each BLOCK_M rows of x. Not yet
# tuned on a GPU; it only splits prefill from decode.
DENSE_FROM_ROWS = 256


class TritonGPTQ(Kernel):
    name = "triton-gptq"
    priority = 10
    devices = frozenset({"cuda"})
    dtypes = frozenset({torch.float16, torch.bfloat16, torch.float32})

    @classmethod
    def rejects(cls, fmt: LinearFormat, device: str, dtype: torch.dtype) -> str | None:
        reason = super().rejects(fmt, device, dtype)
        if reason is None and importlib.util.find_spec("triton") is None:
            return "triton is not installed (pip install 'treeq[triton]')"
        return reason

    @staticmethod
    def forward(layer, x: torch.Tensor) -> torch.Tensor:
        from ._triton import gptq

        packed = (layer.qweight, layer.qzeros, layer.scales, layer.g_idx)
        rows = x.reshape(-1, layer.in_features)
        bias = None if layer.bias is None else layer.bias.to(x.dtype)
        # Triton launches on the current CUDA device; a model spread over GPUs needs x's device.
        with torch.cuda.device_of(x):
            if rows.shape[0] >= DENSE_FROM_ROWS:
                y = F.linear(rows, gptq.dequantize(*packed, layer.fmt.bits, x.dtype), bias)
            else:
                y = gptq.matmul(rows, *packed, layer.fmt.bits)
                if bias is not None:
                    y += bias
        return y.reshape(*x.shape[:-1], layer.out_features)


KERNEL = TritonGPTQ
