"""Reference kernel: unpack, dequantize through the numerics module, then a dense matmul.

Runs every format on every device; the exactness yardstick for faster kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Kernel


class TorchReference(Kernel):
    name = "torch"
    priority = 0
    grids = None  # dequantizes through treeq.numerics, so every grid

    @staticmethod
    def forward(layer, x: torch.Tensor) -> torch.Tensor:
        w = layer.dequantized_weight().to(x.dtype)
        bias = None if layer.bias is None else layer.bias.to(x.dtype)
        return F.linear(x, w, bias)


KERNEL = TorchReference
