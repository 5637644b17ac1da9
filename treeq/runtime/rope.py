"""Keys stored before RoPE (KVQuant): the rotary embedding undone before a key is quantized and
redone when it is read, with the angles of the rotary module the spec's attention block names.

The convention is the one Llama-style models apply (``k * cos + rotate_half(k) * sin``, the two
halves of the head rotated as pairs). Positions are the cache's own token indices: undoing and
redoing use the same angles, so whatever positions the model used (left padding shifts them), a key
comes back as it went in, up to fp32 rounding; only what "before RoPE" means for a shifted row changes.
Angles and the arithmetic are fp32.
"""

from __future__ import annotations

import torch
from torch import nn


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dimension: multiplication by i."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class KeyRotation:
    def __init__(self, rotary: nn.Module):
        self.rotary = rotary

    def _angles(self, start: int, tokens: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(start, start + tokens, device=device)[None]
        # The rotary module takes x only for its device and dtype: an empty fp32 tensor gives fp32 angles.
        cos, sin = self.rotary(torch.empty(0, device=device), positions)
        return cos[:, None], sin[:, None]  # [1, 1, tokens, head_dim] against [batch, heads, tokens, head_dim]

    def unrotate(self, keys: torch.Tensor, start: int) -> torch.Tensor:
        """Keys [batch, heads, tokens, head_dim] at positions start.. as before RoPE, fp32."""
        cos, sin = self._angles(start, keys.shape[-2], keys.device)
        keys = keys.float()
        # The inverse rotation, divided by the squared norm the angles carry (a scaled RoPE's
        # attention factor; 1 up to rounding otherwise).
        return (keys * cos - _rotate_half(keys) * sin) / (cos * cos + sin * sin)

    def rotate(self, keys: torch.Tensor, start: int, dtype: torch.dtype) -> torch.Tensor:
        """RoPE applied to keys before it, at positions start.., in ``dtype``."""
        cos, sin = self._angles(start, keys.shape[-2], keys.device)
        keys = keys.float()
        return (keys * cos + _rotate_half(keys) * sin).to(dtype)
