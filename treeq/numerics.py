"""The one home of quantization grids.

Methods, packers, kernels and tests all quantize and dequantize through these functions, so the
fake-quant weight a method optimises against is bit-for-bit the weight a kernel reconstructs from
the checkpoint. Two rules make that hold:

* scales are rounded to the checkpoint's storage dtype (fp16) the moment they are computed, so no
  method ever sees a scale the checkpoint cannot store;
* dequantization is always ``(code - zero) * scale`` evaluated in fp32, in that order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SCALE_DTYPE = torch.float16
SUPPORTED_BITS = (2, 3, 4, 8)


@dataclass(frozen=True)
class UniformGrid:
    """An unsigned integer grid [0, 2^bits - 1] with per-group scale and integer zero point."""

    bits: int
    sym: bool

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def params(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point per row of ``w`` (rows = output channels, columns = one group).

        Symmetric grids pin the zero point to the middle code (GPTQ convention), so a symmetric
        checkpoint stays loadable by kernels that ignore ``qzeros``.
        """
        w = w.float()
        lo = w.amin(dim=1).clamp(max=0)
        hi = w.amax(dim=1).clamp(min=0)
        if self.sym:
            hi = torch.maximum(lo.abs(), hi)
            scale = 2 * hi / self.maxq
            zero = torch.full_like(scale, (self.maxq + 1) // 2)
        else:
            scale = (hi - lo) / self.maxq
        # An all-zero row would give scale 0 and divide by zero; any positive scale codes it exactly.
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        scale = scale.to(SCALE_DTYPE).float()
        if not self.sym:
            zero = torch.round(-lo / scale).clamp(0, self.maxq)
        return scale, zero

    def quantize(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Integer codes for ``w``; ``scale``/``zero`` broadcast against it."""
        return torch.clamp(torch.round(w.float() / scale) + zero, 0, self.maxq)

    @staticmethod
    def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return (codes.float() - zero) * scale

    def fake_quantize(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return self.dequantize(self.quantize(w, scale, zero), scale, zero)


def dequantize_grouped(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor
) -> torch.Tensor:
    """Weight [out, in] from codes [out, in] and per-group params [groups, out] indexed by g_idx."""
    g = g_idx.long()
    return UniformGrid.dequantize(codes, scales.float()[g].T, zeros.float()[g].T)


def _ste(value: torch.Tensor, through: torch.Tensor) -> torch.Tensor:
    """``value`` in the forward pass, the identity's gradient to ``through`` in the backward."""
    return through + (value - through).detach()


def minmax_params(w: torch.Tensor, maxq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable asymmetric scale and (real-valued) zero point per row of ``w``, from its
    min and max; the start point of learned quantizers."""
    lo, hi = w.amin(dim=-1, keepdim=True), w.amax(dim=-1, keepdim=True)
    scale = _ste((hi - lo).clamp(min=1e-5), hi - lo) / maxq
    return scale, -lo / scale


def fake_quantize_learned(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """:meth:`UniformGrid.fake_quantize` with learnable ``scale`` and real ``zero``: rounding and
    clamping pass gradients straight through, the scale is the fp16 value a checkpoint stores and
    the zero point the integer it stores, so the exported codes dequantize to this very weight."""
    scale = _ste(scale.clamp(min=1e-5).to(SCALE_DTYPE).float(), scale)
    zero = _ste(torch.round(zero).clamp(0, maxq), zero)
    codes = _ste(torch.round(w / scale), w / scale) + zero
    codes = _ste(codes.clamp(0, maxq), codes)
    return (codes - zero) * scale
