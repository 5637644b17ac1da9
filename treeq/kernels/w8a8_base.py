"""What the W8A8 kernels share: the layers they take (8-bit per-row symmetric weights with 8-bit
symmetric inputs, per token at run time or per tensor calibrated), the signed int8 weight they
multiply, and the input's integers, which are exactly those of the layer's fake-quant path."""

from __future__ import annotations

from typing import Callable

import torch

from .. import numerics
from .base import Kernel


class W8A8Kernel(Kernel):
    bits = frozenset({8})
    group_sizes = frozenset({-1})  # the int32 sums take one weight scale per row
    supports_asym = False
    supports_desc_act = False
    integer_inputs = True
    # Whether LLM.int8()'s outlier columns (an activation outlier threshold) are run.
    runs_outlier_columns = False

    @classmethod
    def rejects(cls, fmt, device, dtype) -> str | None:
        reason = super().rejects(fmt, device, dtype)
        if reason is not None:
            return reason
        a = fmt.activation
        if a is None:
            return "weight-only layer; runs 8-bit symmetric inputs only"
        outliers_ok = cls.runs_outlier_columns or a.outlier_threshold is None
        dynamic = (a.bits, a.granularity, a.sym, a.dynamic) == (8, "per-token", True, True) and outliers_ok
        static = (a.bits, a.granularity, a.sym, a.dynamic, a.outlier_threshold) == (8, "per-tensor", True, False, None)
        if not (dynamic or static):
            outliers = " (outlier columns too)" if cls.runs_outlier_columns else ", no outlier columns,"
            return f"activations {a.describe()}; runs 8-bit sym per-token dynamic{outliers} or per-tensor static"
        return None


def int8_weight(layer) -> torch.Tensor:
    """The layer's codes as signed int8 [out, in]: code minus the (middle) zero point."""
    return (layer.codes().to(torch.int16) - layer.zeros()[0].to(torch.int16)[:, None]).to(torch.int8)


def quantized_input(
    quantizer, x: torch.Tensor, per_token: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes of ``x`` [tokens, in] and each token's scale: its own range by ``per_token``
    (dynamic), or the layer's calibrated one, the codes exactly those of the quantizer's fake-quant."""
    if quantizer.scheme.dynamic:
        return per_token(x)
    codes = numerics.quantize_activation_with(x, quantizer.scale, quantizer.zero, 8, sym=True)
    return codes, quantizer.scale.expand(x.shape[0]).contiguous()
