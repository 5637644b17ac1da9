"""SmoothQuant (Xiao et al., 2023): move the activations' outlier ranges into the weights, which
quantize easily, so both sides of a W8A8 matmul have moderate ranges.

Per subset, s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) for input channel j (max|X_j| over the
calibration tokens, max|W_j| over every module of the subset); folding then divides the inputs by s
and multiplies the weights' columns by it. alpha = 0.5 gives both the same per-channel range; larger
alpha moves more of it to the weights.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..methods.base import InputStats
from .base import RoundWeight, ScaleMigration

# Keeps dead channels (never active, or all-zero weight columns) from giving scales of 0 or inf.
FLOOR = 1e-5


class SmoothQuantOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    alpha: float = Field(0.5, ge=0.0, le=1.0, description="migration strength: 0 none, 1 all into weights")


class SmoothQuant(ScaleMigration):
    name = "smoothquant"
    Options = SmoothQuantOptions

    def scales(self, weights: list[torch.Tensor], stats: InputStats, round_weight: RoundWeight) -> torch.Tensor:
        alpha = self.options.alpha
        x_max = stats.absmax.clamp(min=FLOOR)
        w_max = torch.stack([w.float().abs().amax(dim=0) for w in weights]).amax(dim=0).clamp(min=FLOOR)
        return x_max.pow(alpha) / w_max.pow(1 - alpha)


TRANSFORM = SmoothQuant
