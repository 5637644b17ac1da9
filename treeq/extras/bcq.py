"""Binary-coding quantization's per-group tensors (:mod:`treeq.bcq`): the layer's weight is
offset + sum_i alpha_i b_i, not (code - zero) * scale.

The bit-planes travel in GPTQ's ``qweight`` as q-bit codes (bit i of a code: the sign of plane i,
1 = +1), so they cost q bits per weight as in LUT-GEMM; ``bcq_alphas`` fp16 [q, groups, out] and
``bcq_offsets`` fp32 [groups, out] (zeros without an offset) are kept here. The method writes
``scales`` 1 and ``qzeros`` the middle code, which this dequantization does not read. Groups are
contiguous runs of ``in / groups`` inputs. Not additive: only kernels listing "bcq" (the LUT kernel,
the reference kernel) run these layers.
"""

from __future__ import annotations

import torch

from ..bcq import BCQWeight, codes_from_planes, planes_from_codes
from .base import WeightExtras


class BCQExtras(WeightExtras):
    kind = "bcq"
    names = ("bcq_alphas", "bcq_offsets")

    @classmethod
    def of(cls, weight: BCQWeight) -> tuple["BCQExtras", torch.Tensor]:
        """(the extras, the codes [out, in] that carry the planes)."""
        extras = cls({"bcq_alphas": weight.alphas, "bcq_offsets": weight.offsets})
        return extras, codes_from_planes(weight.planes)

    def weight(self, codes: torch.Tensor) -> BCQWeight:
        alphas, offsets = self.tensors["bcq_alphas"], self.tensors["bcq_offsets"]
        group_size = codes.shape[1] // offsets.shape[0]
        return BCQWeight(planes_from_codes(codes, alphas.shape[0]), alphas, offsets, group_size)

    def dequantize(self, codes, scales, zeros, g_idx, grid) -> torch.Tensor:
        return self.weight(codes).dequantize()

    def describe(self, in_features: int, out_features: int) -> str:
        q, groups = self.tensors["bcq_alphas"].shape[:2]
        offset = "with offset" if bool(self.tensors["bcq_offsets"].any()) else "no offset"
        return f"BCQ {q} planes, {offset}, groups of {in_features // groups}"


EXTRAS = BCQExtras
