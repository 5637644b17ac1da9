"""SpQR's extras (Dettmers et al., 2023): its outliers as a sparse residual, plus the second-level
statistics its group scales are quantized with.

Each group's per-row scale is stored as a ``bits``-bit code over runs of ``group`` output rows,
with an fp16 step and minimum per run (:func:`treeq.numerics.quantize_minmax_groups`). The fp16
``scales`` a kernel reads are exactly what these dequantize to (:func:`scales_from_statistics`),
so a format may store the codes instead of the scales and rebuild them exactly:

* ``scale_codes`` uint8 [groups, out], ``scale_step`` and ``scale_min`` fp16 [groups, out / group];
* the residual's ``residual_rows``, ``residual_cols``, ``residual_values``
  (:mod:`treeq.extras.sparse_residual`).

Zero points need no second level here: they are integers below 2^bits already.
"""

from __future__ import annotations

import torch

from ..numerics import SCALE_DTYPE, dequantize_minmax_groups, quantize_minmax_groups
from .sparse_residual import SparseResidual

STATISTICS = ("scale_codes", "scale_step", "scale_min")


def quantize_scales(scales: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, ...]:
    """(codes, step, min) of per-row scales [..., out], over runs of ``group`` rows."""
    return quantize_minmax_groups(scales, bits, dim=-1, group=group)


def scales_from_statistics(codes: torch.Tensor, step: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """The fp16 scales [..., out] the statistics stand for: codes * step + min, rounded once."""
    group = codes.shape[-1] // step.shape[-1]
    return dequantize_minmax_groups(codes, step, low, dim=-1, group=group).to(SCALE_DTYPE)


class SpQRExtras(SparseResidual):
    kind = "spqr"
    names = (*STATISTICS, *SparseResidual.names)

    def statistics(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(self.tensors[n] for n in STATISTICS)

    def describe(self, in_features: int, out_features: int) -> str:
        codes, step, _ = self.statistics()
        rows = codes.shape[-1] // step.shape[-1]
        return f"outliers {self.nnz / (in_features * out_features):.3%}, scales on a second level per {rows} rows"


EXTRAS = SpQRExtras
