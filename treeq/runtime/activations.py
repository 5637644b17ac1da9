"""Quantizers of a quantized linear's input (its activations).

A :class:`ActivationQuantizer` is attached to a ``QuantLinear`` and sees the input the matmul takes
(after any input transform). In evaluation and calibration it fake-quantizes (quantize, then
dequantize in the input's dtype); a kernel that multiplies integer inputs asks it for the integer
values instead, so both agree on them exactly.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..numerics import (
    activation_params,
    dequantize,
    fake_quantize_activation,
    fake_quantize_razored_activation,
    quantize_activation_with,
)
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
    """Quantize-dequantize the input by an :class:`ActivationScheme`, through
    :mod:`treeq.numerics` (what integer kernels compute exactly): on levels from each input's own
    range (dynamic), or on levels calibrated once from the calibration inputs' range (static; the
    buffers ``scale`` and ``zero``, one per tensor or per group of input channels, are saved with
    the layer).

    With an ``outlier_threshold`` (LLM.int8()'s decomposition), the input columns whose magnitude
    exceeds it in any token of this input pass unquantized and the others are quantized without
    them, so one outlier does not coarsen its token's scale. ``outlier_share`` keeps the running
    share of columns passed so, for the per-module table.
    """

    def __init__(self, scheme: ActivationScheme, in_features: int):
        super().__init__()
        self.scheme = scheme
        self.outlier_share = 0.0
        self._calls = 0
        if not scheme.dynamic:
            groups = 1 if scheme.granularity == "per-tensor" else in_features // scheme.group_size
            self.register_buffer("scale", torch.ones(groups))
            self.register_buffer("zero", torch.zeros(groups, dtype=torch.int32))

    def calibrate(self, low: torch.Tensor, high: torch.Tensor) -> "FakeQuantActivation":
        """Static levels from each input channel's calibrated range [low, high] (containing 0).
        With an outlier threshold, values beyond it always pass unquantized, so the levels need
        only reach it."""
        t = self.scheme.outlier_threshold
        if t is not None:
            low, high = low.clamp(min=-t), high.clamp(max=t)
        groups = self.scale.shape[0]
        low, high = low.reshape(groups, -1).amin(dim=-1), high.reshape(groups, -1).amax(dim=-1)
        if self.scheme.sym:
            low, high = None, torch.maximum(-low, high)
        self.scale, self.zero = activation_params(low, high, self.scheme.bits, self.scheme.sym)
        return self

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
        if not s.dynamic:
            grouped = x.unflatten(-1, (self.scale.shape[0], -1))
            scale, zero = self.scale[:, None], self.zero[:, None]
            codes = quantize_activation_with(grouped, scale, zero, s.bits, s.sym)
            return dequantize(codes, scale, zero).flatten(-2).to(x.dtype)
        if s.granularity == "per-group":
            grouped = x.unflatten(-1, (x.shape[-1] // s.group_size, s.group_size))
            return fake_quantize_activation(grouped, s.bits, True, s.sym).flatten(-2)
        return fake_quantize_activation(x, s.bits, s.granularity == "per-token", s.sym)

    def extra_repr(self) -> str:
        return self.scheme.describe()


def input_quantizer(scheme: ActivationScheme | None, in_features: int) -> ActivationQuantizer | None:
    """The quantizer of a linear's input under ``scheme`` (static levels not yet calibrated);
    None: inputs as they come."""
    return None if scheme is None else FakeQuantActivation(scheme, in_features)
