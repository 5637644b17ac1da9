"""Quantizers of a quantized linear's input (its activations).

A :class:`ActivationQuantizer` is attached to a ``QuantLinear`` and sees the input the matmul takes
(after any input transform). In evaluation and calibration it fake-quantizes (quantize, then
dequantize in the input's dtype); a kernel that multiplies integer inputs asks it for the integer
values instead, so both agree on them exactly.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..numerics import fake_quantize_activation, fake_quantize_razored_activation
from ..schemes import ActivationScheme


class ActivationQuantizer(nn.Module):
    """Maps a layer input [..., in_features] to the values the matmul sees."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class IdentityActivation(ActivationQuantizer):
    """Leaves inputs unchanged: proves an attachment changes nothing by itself."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class FakeQuantActivation(ActivationQuantizer):
    """Quantize-dequantize the input at run time by an :class:`ActivationScheme`, through
    :func:`treeq.numerics.fake_quantize_activation` (what integer kernels compute exactly).

    With an ``outlier_threshold`` (LLM.int8()'s decomposition), the input columns whose magnitude
    exceeds it in any token of this input pass unquantized and the others are quantized without
    them, so one outlier does not coarsen its token's scale. ``outlier_share`` keeps the running
    share of columns passed so, for the per-module table.
    """

    def __init__(self, scheme: ActivationScheme):
        super().__init__()
        if not scheme.dynamic:
            raise ValueError("activations.dynamic=False (calibrated static ranges) is not built yet; use dynamic=True")
        self.scheme = scheme
        self.outlier_share = 0.0
        self._calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outliers = self.outlier_columns(x)
        if outliers is None or not bool(outliers.any()):
            return self._fake(x)
        return torch.where(outliers, x, self._fake(x.masked_fill(outliers, 0)))

    def outlier_columns(self, x: torch.Tensor) -> torch.Tensor | None:
        """Which input columns of ``x`` [..., K] pass unquantized (bool [K]); None without a
        threshold. Integer kernels ask here too, so ``outlier_share`` counts every input."""
        threshold = self.scheme.outlier_threshold
        if threshold is None:
            return None
        outliers = (x.abs() > threshold).reshape(-1, x.shape[-1]).any(dim=0)
        self._calls += 1
        self.outlier_share += (float(outliers.float().mean()) - self.outlier_share) / self._calls
        return outliers

    def _fake(self, x: torch.Tensor) -> torch.Tensor:
        s = self.scheme
        if s.grid == "qrazor":
            return fake_quantize_razored_activation(x, s.bits, s.group_size)
        if s.granularity == "per-group":
            grouped = x.unflatten(-1, (x.shape[-1] // s.group_size, s.group_size))
            return fake_quantize_activation(grouped, s.bits, True, s.sym).flatten(-2)
        return fake_quantize_activation(x, s.bits, s.granularity == "per-token", s.sym)

    def extra_repr(self) -> str:
        s = self.scheme
        outliers = "" if s.outlier_threshold is None else f", fp columns above {s.outlier_threshold}"
        return f"a{s.bits} {s.granularity} {'sym' if s.sym else 'asym'}{outliers}"


def input_quantizer(scheme: ActivationScheme | None) -> ActivationQuantizer | None:
    """The quantizer of a linear's input under ``scheme``; None: inputs as they come."""
    return None if scheme is None else FakeQuantActivation(scheme)
