"""Binary-coding quantization's per-group tensors (:mod:`treeq.bcq`): the layer's weight is
offset + sum_i alpha_i b_i, not (code - zero) * scale.

GPTQ's tensors carry what fits them: ``qweight`` the bit-planes as q-bit codes (bit i of a code: the
sign of plane i, 1 = +1), so they cost q bits per weight as in LUT-GEMM; ``scales`` (fp16 [groups,
out]) the first plane's alphas. Kept here: ``bcq_alphas`` fp16 [q - 1, groups, out], the other
planes' alphas, and ``bcq_offsets`` fp32 [groups, out] (zeros without an offset). ``qzeros`` holds
the middle code and is not read. Groups are contiguous runs of ``in / groups`` inputs. Not
additive: only kernels listing "bcq" (the LUT kernel, the reference kernel) run these layers.
"""

from __future__ import annotations

import torch

from ..bcq import BCQWeight, codes_from_planes, planes_from_codes
from ..numerics import SCALE_DTYPE
from .base import WeightExtras


class BCQExtras(WeightExtras):
    kind = "bcq"
    names = ("bcq_alphas", "bcq_offsets")

    @classmethod
    def of(cls, weight: BCQWeight) -> tuple["BCQExtras", torch.Tensor, torch.Tensor]:
        """(the extras, the codes [out, in] that carry the planes, the scales that carry the first
        plane's alphas)."""
        extras = cls({"bcq_alphas": weight.alphas[1:], "bcq_offsets": weight.offsets})
        return extras, codes_from_planes(weight.planes), weight.alphas[0]

    def weight(self, codes: torch.Tensor, scales: torch.Tensor) -> BCQWeight:
        alphas = torch.cat([scales.to(SCALE_DTYPE)[None], self.tensors["bcq_alphas"]])
        offsets = self.tensors["bcq_offsets"]
        group_size = codes.shape[1] // offsets.shape[0]
        return BCQWeight(planes_from_codes(codes, alphas.shape[0]), alphas, offsets, group_size)

    def dequantize(self, codes, scales, zeros, g_idx, grid) -> torch.Tensor:
        return self.weight(codes, scales).dequantize()

    def describe(self, in_features: int, out_features: int) -> str:
        q, groups = self.tensors["bcq_alphas"].shape[0] + 1, self.tensors["bcq_alphas"].shape[1]
        offset = "with offset" if bool(self.tensors["bcq_offsets"].any()) else "no offset"
        return f"BCQ {q} planes, {offset}, groups of {in_features // groups}"


EXTRAS = BCQExtras
