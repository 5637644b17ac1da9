"""Quantizers of a quantized linear's input (its activations).

A :class:`ActivationQuantizer` is attached to a ``QuantLinear`` and sees the input the matmul takes
(after any input transform). In evaluation and calibration it fake-quantizes (quantize, then
dequantize in the input's dtype); a kernel that multiplies integer inputs asks it for the integer
values instead, so both agree on them exactly.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class ActivationQuantizer(nn.Module):
    """Maps a layer input [..., in_features] to the values the matmul sees."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class IdentityActivation(ActivationQuantizer):
    """Leaves inputs unchanged: proves an attachment changes nothing by itself."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x
