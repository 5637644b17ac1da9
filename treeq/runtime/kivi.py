"""KIVI's KV quantizer (Liu et al., 2024): asymmetric min/max levels per group, keys grouped along
tokens (one scale per channel per ``group`` tokens: key outliers sit in fixed channels) and values
along channels (one scale per token per ``group`` channels). The levels come from
treeq/numerics.py; codes are packed with treeq/packing.py along the grouped axis, whose length the
group makes a multiple of what packing needs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import TreeqError
from ..numerics import dequantize_minmax_groups, quantize_minmax_groups
from ..packing import pack, period, unpack
from .kv_cache import KVQuantizer

TOKEN_DIM, CHANNEL_DIM = -2, -1  # of states [batch, kv_heads, tokens, head_dim]


@dataclass
class PackedStates:
    """One block of states as the cache holds it: int32 words, and fp16 scale and minimum per group."""

    words: torch.Tensor  # codes of the grouped axis packed along dim 0, other axes flattened
    scale: torch.Tensor
    low: torch.Tensor
    codes_shape: torch.Size  # the codes with the grouped axis first, as packed
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return self.words.nbytes + self.scale.nbytes + self.low.nbytes


class MinMaxKV(KVQuantizer):
    def __init__(self, bits: int, per_channel: bool, group: int):
        codes_per_run = period(bits)[0]
        if group % codes_per_run:
            raise TreeqError(
                f"groups of {group} cannot be packed at {bits} bits; use a group size that is a multiple "
                f"of {codes_per_run}"
            )
        self.bits, self.group = bits, group
        self.dim = TOKEN_DIM if per_channel else CHANNEL_DIM
        # Per channel, a group spans tokens, so the cache must hand over whole groups of tokens.
        self.token_block = group if per_channel else 1

    def encode(self, states: torch.Tensor) -> PackedStates:
        codes, scale, low = quantize_minmax_groups(states, self.bits, self.dim, self.group)
        rows = codes.movedim(self.dim, 0)
        words = pack(rows.flatten(1), self.bits)
        return PackedStates(words, scale, low, rows.shape, states.dtype)

    def decode(self, stored: PackedStates) -> torch.Tensor:
        codes = unpack(stored.words, self.bits).reshape(stored.codes_shape).movedim(0, self.dim)
        states = dequantize_minmax_groups(codes, stored.scale, stored.low, self.dim, self.group)
        return states.to(stored.dtype)
