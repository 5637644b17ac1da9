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
from .base import InputSample, RoundWeight, ScaleMigration

# Keeps dead channels (never active, or all-zero weight columns) from giving scales of 0 or inf.
FLOOR = 1e-5


# The strengths a search tries, and the calibration input rows it judges them on.
ALPHAS = tuple(i / 20 for i in range(2, 20))
SEARCH_ROWS = 512


class SmoothQuantOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    alpha: float = Field(0.5, ge=0.0, le=1.0, description="migration strength: 0 none, 1 all into weights")
    search: bool = Field(
        False, description="per subset, the alpha of 0.1..0.95 with the least output error on calibration inputs"
    )


class SmoothQuant(ScaleMigration):
    """With ``search``, each subset takes the strength whose quantized subset (inputs through the
    subset's input quantizer, weights rounded on its scheme) is closest to the fp one on
    SEARCH_ROWS calibration input rows, summed over its modules; ``alpha`` is then unused."""

    name = "smoothquant"
    Options = SmoothQuantOptions

    def sample_rows(self) -> int:
        return SEARCH_ROWS if self.options.search else 0

    def scales(
        self,
        weights: list[torch.Tensor],
        stats: InputStats,
        round_weight: RoundWeight,
        sample: InputSample | None = None,
    ) -> torch.Tensor:
        x_max = stats.absmax.clamp(min=FLOOR)
        w_max = torch.stack([w.float().abs().amax(dim=0) for w in weights]).amax(dim=0).clamp(min=FLOOR)
        if not self.options.search:
            return _balance(x_max, w_max, self.options.alpha)
        x = sample.rows
        exact = [x @ w.float().T for w in weights]

        def error(s: torch.Tensor) -> float:
            xq = x / s if sample.quantize is None else sample.quantize(x / s, s)
            return sum(float(((xq @ round_weight(w.float() * s).T - y) ** 2).sum()) for w, y in zip(weights, exact))

        return min((_balance(x_max, w_max, a) for a in ALPHAS), key=error)


def _balance(x_max: torch.Tensor, w_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)."""
    return x_max.pow(alpha) / w_max.pow(1 - alpha)


TRANSFORM = SmoothQuant
