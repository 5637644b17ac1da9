"""AWQ's scale search (Lin et al., 2023): scale up the input channels that carry large activations
before rounding, so their weights get finer steps.

Per subset, s = a^alpha (a: each input channel's RMS on the fp layer's inputs, from H's diagonal),
alpha chosen on a grid to minimise the subset's output error E[(x (W - R(W diag(s)) / s)^T)^2]
computed exactly from H, where R is the scheme's round-to-nearest. alpha = 0 (no scaling) is on the
grid, so on this objective the search never loses to plain rounding. Whatever method quantizes
afterwards (RTN for ``--method awq``, GPTQ with ``--migration awq``) starts from the scaled weights.
"""

from __future__ import annotations

import torch

from ..methods.base import InputStats, output_error
from .base import RoundWeight, ScaleMigration, centred

ALPHAS = [i / 20 for i in range(20)]


class AWQSearch(ScaleMigration):
    name = "awq"

    def scales(
        self, weights: list[torch.Tensor], stats: InputStats, round_weight: RoundWeight, sample=None
    ) -> torch.Tensor:
        rms = stats.h.diagonal().clamp(min=0).sqrt()
        # Dead channels would get scale 0; lift them to a small share of the largest.
        rms = rms.clamp(min=float(rms.max()) * 1e-4 + 1e-12)
        best, best_loss = None, float("inf")
        for alpha in ALPHAS:
            s = centred(rms.pow(alpha))
            loss = sum(output_error(w, round_weight(w.float() * s) / s, stats.h) for w in weights)
            if loss < best_loss:
                best, best_loss = s, loss
        return best


TRANSFORM = AWQSearch
