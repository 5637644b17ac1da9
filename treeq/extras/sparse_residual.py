"""A sparse full-precision residual added to the dense weight (SpQR's outliers), stored as CSR.

``residual_rows`` int32 [out + 1] (CSR row pointers), ``residual_cols`` int16 [nnz] (int32 for
layers wider than int16 holds), ``residual_values`` fp16 [nnz]. Where a method keeps a weight here
it sets the dense code to the zero point, so the dense weight is exactly 0 there and the value is
the whole weight: dense + residual is exact in fp32.
"""

from __future__ import annotations

import warnings

import torch

from .base import WeightExtras

VALUE_DTYPE = torch.float16


def index_dtype(in_features: int) -> torch.dtype:
    return torch.int16 if in_features <= torch.iinfo(torch.int16).max + 1 else torch.int32


class SparseResidual(WeightExtras):
    kind = "sparse_residual"
    names = ("residual_rows", "residual_cols", "residual_values")
    additive = True

    def __init__(self, tensors: dict[str, torch.Tensor]):
        super().__init__(tensors)
        self._csr: torch.Tensor | None = None  # built on the first matmul

    @classmethod
    def from_mask(cls, values: torch.Tensor, mask: torch.Tensor) -> "SparseResidual":
        """The entries of ``values`` [out, in] where ``mask`` is set, rounded to fp16, row by row."""
        rows, cols = mask.nonzero(as_tuple=True)  # row-major order, as CSR wants
        counts = torch.bincount(rows, minlength=mask.shape[0])
        pointers = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)
        return cls(
            {
                "residual_rows": pointers,
                "residual_cols": cols.to(index_dtype(mask.shape[1])),
                "residual_values": values[rows, cols].to(VALUE_DTYPE),
            }
        )

    @property
    def nnz(self) -> int:
        return self.tensors["residual_values"].numel()

    def csr(self, in_features: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        t = self.tensors
        rows = t["residual_rows"]
        shape = (rows.numel() - 1, in_features)
        with warnings.catch_warnings():  # "CSR support is in beta": the ops used here are not
            warnings.simplefilter("ignore", UserWarning)
            cols, values = t["residual_cols"].to(torch.int32), t["residual_values"].to(dtype)
            return torch.sparse_csr_tensor(rows, cols, values, shape, check_invariants=False)

    def add_to(self, weight: torch.Tensor) -> torch.Tensor:
        t = self.tensors
        rows = t["residual_rows"].long()
        row_of = torch.repeat_interleave(torch.arange(rows.numel() - 1, device=rows.device), rows[1:] - rows[:-1])
        weight[row_of, t["residual_cols"].long()] += t["residual_values"].float()
        return weight

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self._csr is None or self._csr.shape[1] != x.shape[-1]:
            self._csr = self.csr(x.shape[-1])  # once per instance: QuantLinear keeps one
        return (self._csr @ x.float().T).T

    def describe(self, in_features: int, out_features: int) -> str:
        return f"sparse residual {self.nnz / (in_features * out_features):.3%}"


EXTRAS = SparseResidual
