"""QRazor's KV-cache quantizer: each token's key (or value) vector of a head absmax-quantized to
8 bits with an fp16 scale, then razored per group of ``group`` channels to a sign and bits - 1
bits from the group's leading one (treeq/numerics.py, the functions the weight grid and razored
activations use). Stored: the codes (magnitude + 2^(bits-1)) packed along channels, one shift per
group (uint8) and the fp16 scale per token; decoding is exact."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import TreeqError
from ..numerics import SCALE_DTYPE, absmax_integers, razor_groups, unrazor
from ..packing import pack, period, unpack
from .kv_cache import KVQuantizer

BASE_BITS = 8  # QRazor's base width for the KV cache


@dataclass
class RazoredStates:
    """One block of states as the cache holds it."""

    words: torch.Tensor  # codes packed along head_dim (dim 0), the other axes flattened
    shifts: torch.Tensor  # uint8 [batch, kv_heads, tokens, head_dim / group]
    scale: torch.Tensor  # fp16 [batch, kv_heads, tokens, 1]
    codes_shape: torch.Size  # the codes with head_dim first, as packed
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return self.words.nbytes + self.shifts.nbytes + self.scale.nbytes


class QRazorKV(KVQuantizer):
    """Per token, groups of ``group`` channels; the cache may hand over any number of tokens."""

    def __init__(self, bits: int, group: int, head_dim: int):
        if head_dim % group or head_dim % period(bits)[0]:
            raise TreeqError(
                f"head_dim {head_dim} splits into neither groups of {group} channels nor {bits}-bit packed words; "
                f"set group_size (--kv-group-size) to a divisor of {head_dim}"
            )
        self.bits, self.group = bits, group

    def encode(self, states: torch.Tensor) -> RazoredStates:
        q, scale = absmax_integers(states, BASE_BITS, SCALE_DTYPE)
        mag, shift = razor_groups(q, self.bits, self.group, BASE_BITS)
        rows = (mag + 2 ** (self.bits - 1)).to(torch.uint8).movedim(-1, 0)
        words = pack(rows.flatten(1), self.bits)
        return RazoredStates(words, shift.to(torch.uint8), scale.to(SCALE_DTYPE), rows.shape, states.dtype)

    def decode(self, stored: RazoredStates) -> torch.Tensor:
        codes = unpack(stored.words, self.bits).reshape(stored.codes_shape).movedim(0, -1)
        mag = codes.float() - 2 ** (self.bits - 1)
        return unrazor(mag, stored.shifts, stored.scale.float()).to(stored.dtype)
