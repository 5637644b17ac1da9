"""KVQuant's KV quantizer (Hooper et al., 2024), each part switchable for its ablation.

Every stored entry is ``center + half * level[code]`` (treeq/numerics.py's lookup-table levels):

* the range: per channel, one calibrated (center, half) per kv head and channel for all tokens
  (keys: their outliers sit in fixed channels; calibrated offline because a range per channel
  cannot be known before the tokens are); per token, each token's group of channels, computed as
  it arrives and stored in fp16;
* the levels: 2^bits values in [-1, 1], evenly spaced (uniform: then this is min/max rounding) or
  the layer's own from Fisher-weighted k-means on calibration activations (kv_calibration.py);
* dense-and-sparse outliers: a share of the entries kept in fp16 beside the codes, by flat
  position, and the range taken without them. Per channel, the entries outside the calibrated
  range, which calibration sets at the share's quantiles; per token, each token's largest
  magnitudes over all its heads (round(share x heads x head_dim) of them).

Codes are packed along head_dim with treeq/packing.py. Without outliers, entries outside a
calibrated range are clamped to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import TreeqError
from ..numerics import dequantize_levels, quantize_to_levels, storable_range
from ..packing import pack, period, unpack
from .kv_cache import KVQuantizer

OUTLIER_DTYPE = torch.float16  # as the paper keeps them


@dataclass
class ChannelRange:
    """A calibrated range per kv head and channel, [heads, head_dim] each, fp32."""

    center: torch.Tensor
    half: torch.Tensor


@dataclass
class KVQuantStates:
    """One block as the cache holds it."""

    words: torch.Tensor  # codes packed along head_dim: [head_dim * bits / 32, batch * heads * tokens]
    center: torch.Tensor | None  # per-token ranges, fp16 [batch, heads, tokens, groups, 1]; None per channel
    half: torch.Tensor | None
    outlier_index: torch.Tensor  # int32 flat positions in the block
    outlier_values: torch.Tensor  # fp16
    shape: torch.Size
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        tensors = (self.words, self.center, self.half, self.outlier_index, self.outlier_values)
        return sum(t.nbytes for t in tensors if t is not None)


@dataclass
class Split:
    """States cut into what the codes hold and what is kept beside them."""

    center: torch.Tensor  # broadcasts against the grouped states [batch, heads, tokens, groups, group]
    half: torch.Tensor
    outliers: torch.Tensor | None  # bool, shaped like the states


class KVQuantKV(KVQuantizer):
    def __init__(
        self,
        bits: int,
        levels: torch.Tensor,
        group: int | None = None,
        channels: ChannelRange | None = None,
        outliers: float = 0.0,
    ):
        if (group is None) == (channels is None):
            raise TreeqError("a KVQuant quantizer takes either a per-token group or a calibrated per-channel range")
        if levels.numel() != 2**bits:
            raise TreeqError(f"{levels.numel()} levels given for {bits} bits; give {2**bits}")
        self.bits, self.levels, self.outliers = bits, levels.float(), outliers
        self.group, self.channels = group, channels
        tables = (self.levels,) if channels is None else (self.levels, channels.center, channels.half)
        self.nbytes = sum(t.nbytes for t in tables)

    def split(self, states: torch.Tensor) -> Split:
        """The range each entry is coded in, and which entries are outliers."""
        x = states.float()
        if self.channels is not None:
            split = self._calibrated()
            if self.outliers > 0:
                split.outliers = ((self.grouped(x) - split.center).abs() > split.half).flatten(-2)
            return split
        outliers = self._largest_per_token(x) if self.outliers > 0 else None
        grouped = self.grouped(x)
        lo, hi = grouped, grouped
        if outliers is not None:
            kept = ~self.grouped(outliers)
            lo, hi = grouped.where(kept, torch.inf), grouped.where(kept, -torch.inf)
        center, half = storable_range(lo.amin(-1, keepdim=True), hi.amax(-1, keepdim=True))
        return Split(center, half, outliers)

    def normalized(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Entries in their range's [-1, 1] coordinates (clamped), and which of them the codes hold
        (not outliers): what calibration fits levels to."""
        split = self.split(states)
        normalized = ((self.grouped(states.float()) - split.center) / split.half).flatten(-2).clamp(-1, 1)
        kept = torch.ones_like(normalized, dtype=torch.bool) if split.outliers is None else ~split.outliers
        return normalized, kept

    def _calibrated(self) -> Split:
        """The calibrated per-channel range, shaped for grouped states (one group of head_dim)."""
        center, half = (t[None, :, None, None, :] for t in (self.channels.center, self.channels.half))
        return Split(center, half, None)

    def grouped(self, x: torch.Tensor) -> torch.Tensor:
        group = x.shape[-1] if self.group is None else self.group
        return x.unflatten(-1, (x.shape[-1] // group, group))

    def _largest_per_token(self, x: torch.Tensor) -> torch.Tensor:
        """Each token's round(share x heads x head_dim) largest magnitudes over all heads."""
        per_token = x.transpose(1, 2).flatten(2)  # [batch, tokens, heads * head_dim]
        k = round(self.outliers * per_token.shape[-1])
        mask = torch.zeros_like(per_token, dtype=torch.bool)
        if k > 0:
            mask.scatter_(-1, per_token.abs().topk(k, dim=-1).indices, True)
        return mask.unflatten(-1, (x.shape[1], x.shape[-1])).transpose(1, 2)

    def _codes(self, states: torch.Tensor, split: Split) -> torch.Tensor:
        return quantize_to_levels(self.grouped(states.float()), split.center, split.half, self.levels).flatten(-2)

    def _dense(self, codes: torch.Tensor, split: Split) -> torch.Tensor:
        return dequantize_levels(self.grouped(codes), split.center, split.half, self.levels).flatten(-2)

    def fake_quantize(self, states: torch.Tensor) -> torch.Tensor:
        """What decode(encode(states)) gives, computed directly: the reference the stored form must meet."""
        split = self.split(states)
        dense = self._dense(self._codes(states, split), split)
        if split.outliers is not None:
            dense = dense.where(~split.outliers, states.to(OUTLIER_DTYPE).float())
        return dense.to(states.dtype)

    def encode(self, states: torch.Tensor) -> KVQuantStates:
        split = self.split(states)
        codes = self._codes(states, split)
        words = pack(codes.movedim(-1, 0).flatten(1), self.bits)
        index = torch.zeros(0, dtype=torch.int32, device=states.device)
        if split.outliers is not None:
            index = split.outliers.flatten().nonzero().squeeze(1).to(torch.int32)
        values = states.flatten()[index.long()].to(OUTLIER_DTYPE)
        per_token = self.channels is None
        center, half = (t.to(OUTLIER_DTYPE) if per_token else None for t in (split.center, split.half))
        return KVQuantStates(words, center, half, index, values, states.shape, states.dtype)

    def decode(self, stored: KVQuantStates) -> torch.Tensor:
        shape = stored.shape
        codes = unpack(stored.words, self.bits).reshape(shape[-1], *shape[:-1]).movedim(0, -1)
        if stored.center is None:
            split = self._calibrated()
        else:
            split = Split(stored.center.float(), stored.half.float(), None)
        dense = self._dense(codes, split).flatten()
        dense[stored.outlier_index.long()] = stored.outlier_values.float()
        return dense.reshape(shape).to(stored.dtype)


def uniform_levels(bits: int) -> torch.Tensor:
    """Evenly spaced levels: with them a range's codes are min/max rounding."""
    return torch.linspace(-1, 1, 2**bits)


def check_packable_heads(bits: int, head_dim: int, group: int | None) -> None:
    """One-line errors for head shapes a KVQuant quantizer cannot hold."""
    codes_per_run = period(bits)[0]
    if head_dim % codes_per_run:
        raise TreeqError(
            f"head_dim {head_dim} cannot be packed at {bits} bits (codes are packed along it, in runs of "
            f"{codes_per_run}); use bits whose run divides it"
        )
    if group is not None and head_dim % group:
        raise TreeqError(
            f"per-token groups of {group} channels do not fit head_dim {head_dim}; set group_size "
            f"(--kv-group-size) to a divisor of {head_dim}"
        )
