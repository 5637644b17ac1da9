"""Round-to-nearest: each group's min/max grid, no use of the calibration data beyond the loss."""

from __future__ import annotations

import torch

from .base import InputStats, Method, QuantResult, output_error


class RTN(Method):
    name = "rtn"

    def quantize(self, weight: torch.Tensor, stats: InputStats) -> QuantResult:
        result = self.round(weight)
        result.loss = output_error(weight, result.weight(), stats.h)
        return result


METHOD = RTN
