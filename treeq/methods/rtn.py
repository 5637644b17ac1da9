"""Round-to-nearest: each group's min/max grid, no use of the calibration data beyond the loss."""

from __future__ import annotations

import math

import torch

from .base import InputStats, Method, QuantResult, output_error


class RTN(Method):
    name = "rtn"

    def round(self, weight: torch.Tensor) -> QuantResult:
        """Codes and grid params of ``weight``, each group rounded on its own grid; loss not set."""
        w = self.grid.prepare(weight.float())
        out, n_in = w.shape
        gs = self.group_size(n_in)
        groups = w.reshape(out, n_in // gs, gs).transpose(0, 1)  # [groups, out, gs]
        scales, zeros = zip(*(self.grid.params(g) for g in groups))
        scales, zeros = torch.stack(scales), torch.stack(zeros)
        codes = self.grid.quantize(groups, scales[..., None], zeros[..., None])
        codes = codes.transpose(0, 1).reshape(out, n_in).to(torch.uint8)
        g_idx = torch.arange(n_in, device=w.device, dtype=torch.int32) // gs
        return QuantResult(codes, scales.half(), zeros.int(), g_idx, loss=math.nan, grid=self.grid.name)

    def quantize(self, weight: torch.Tensor, stats: InputStats) -> QuantResult:
        result = self.round(weight)
        result.loss = output_error(weight, result.weight(), stats.h)
        return result


METHOD = RTN
