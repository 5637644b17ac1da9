"""AWQ (Lin et al., 2023): scale up the input channels that carry large activations before rounding,
so their weights get finer steps, and divide the feeding op's output by the same scales.

Per subset, s = a^alpha (a: each input channel's RMS on the fp layer's inputs, from H's diagonal),
alpha chosen on a grid to minimise the subset's output error E[(x (W - Q(W diag(s)) / s)^T)^2]
computed exactly from H. alpha = 0 (no scaling) is on the grid, so on its objective AWQ never
loses to RTN. Rounding afterwards is RTN's, on the scaled weights.
"""

from __future__ import annotations

import torch

from .base import InputStats, output_error
from .rtn import RTN

ALPHAS = [i / 20 for i in range(20)]


class AWQ(RTN):
    name = "awq"
    rescales_inputs = True

    def input_scales(self, weights: list[torch.Tensor], stats: InputStats) -> torch.Tensor:
        rms = stats.h.diagonal().clamp(min=0).sqrt()
        # Dead channels would get scale 0; lift them to a small share of the largest.
        rms = rms.clamp(min=float(rms.max()) * 1e-4 + 1e-12)
        best, best_loss = None, float("inf")
        for alpha in ALPHAS:
            s = rms.pow(alpha)
            s = s / (s.max() * s.min()).sqrt()  # centred around 1 so neither side of the fold blows up
            loss = sum(output_error(w, self.round(w.float() * s).weight() / s, stats.h) for w in weights)
            if loss < best_loss:
                best, best_loss = s, loss
        return best


METHOD = AWQ
