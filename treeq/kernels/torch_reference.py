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
    extras = None  # and every kind of weight extras, through their own dequantize

    @staticmethod
    def forward(layer, x: torch.Tensor) -> torch.Tensor:
        # An additive extra's term is QuantLinear's to add (a sparse addmm), so it is left out here.
        w = layer.dequantized_weight(additive=False).to(x.dtype)
        bias = None if layer.bias is None else layer.bias.to(x.dtype)
        return F.linear(x, w, bias)


KERNEL = TorchReference
