"""SpQR (Dettmers et al., 2023): GPTQ with small groups whose scales are themselves quantized, and
the weights that quantize worst kept in fp16 as a sparse residual.

The sweep is GPTQ's (act-order, error feedback through chol(H^-1)). At the start of each group of
``group_size`` columns:

1. outlier candidates: for each weight, how much the group's Hessian-weighted squared error
   (errors divided by chol(H^-1)'s diagonal) drops when that weight is left out of the group and
   the grid is fitted to the others (leave-one-out); those dropping it by more than the threshold;
2. each row's grid is fitted to the group without its candidates (with the scheme's clip_search,
   at the clip ratio of least weight error, :meth:`treeq.numerics.Grid.params`), and the per-row scales are
   quantized to ``stats_bits`` over runs of ``stats_group`` rows (an fp16 step and minimum each,
   :mod:`treeq.extras.spqr`); the zero point is an integer taken from the quantized scale.

Then column by column, a weight whose scaled error still exceeds the threshold is an outlier: its
fp16 value goes to the residual, its code to the zero point (so the dense weight is exactly 0
there), and only its fp16 rounding error is fed forward. The threshold is ``outlier_threshold``
times the mean over columns of var(column) / chol(H^-1)_ii^2.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..extras.spqr import STATISTICS, SpQRExtras, quantize_scales, scales_from_statistics
from ..numerics import UniformGrid
from .base import InputStats, Method, QuantResult, output_error
from .gptq import _prepare, _Prepared

# The smallest normal fp16: scales are floored here so their quantized form stays positive.
MIN_SCALE = 2.0**-14


class SpQROptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    outlier_threshold: float = Field(
        0.2, ge=0, description="outlier when the scaled squared error exceeds this times its layer mean; inf: none"
    )
    stats_bits: int = Field(3, ge=1, le=8, description="bits of each group scale's code (second level)")
    stats_group: int = Field(16, gt=0, description="output rows sharing one fp16 step and minimum of the scales")
    perm_order: Literal["act_order", "identity"] = Field(
        "act_order", description="column order of the sweep: decreasing Hessian diagonal, or as stored"
    )
    damp_percent: float = Field(0.01, gt=0, lt=1, description="damping added to H's diagonal, as its mean's share")
    block_size: int = Field(128, gt=0, description="columns updated together (lazy batch updates)")


class SpQR(Method):
    name = "spqr"
    Options = SpQROptions
    grids = (UniformGrid.name,)
    adds_weight_extras = True

    @classmethod
    def reorders_columns(cls, options: SpQROptions) -> bool:
        return options.perm_order == "act_order"

    def quantize(self, weight: torch.Tensor, stats: InputStats) -> QuantResult:
        cfg = self.options
        act_order = cfg.perm_order == "act_order"
        prep: _Prepared = stats.cached("spqr", lambda: _prepare(stats.h, act_order, cfg.damp_percent))
        w = weight.float().clone()
        out, n_in = w.shape
        if out % cfg.stats_group:
            raise ValueError(f"spqr: out_features={out} is not a multiple of options.stats_group={cfg.stats_group}")
        gs = self.group_size(n_in)
        w[:, prep.dead] = 0
        perm = prep.perm if prep.perm is not None else torch.arange(n_in, device=w.device)
        w = w[:, perm]
        u = prep.hinv_upper
        diag = u.diagonal()
        threshold = cfg.outlier_threshold * float((w.var(dim=0) / diag.square()).mean())
        sweep = _Sweep(self, w, u, threshold, gs)
        codes, outlier, values = sweep.run(cfg.block_size)

        inv = torch.argsort(perm)
        g_idx = (torch.arange(n_in, device=w.device) // gs)[inv].to(torch.int32)
        statistics = dict(zip(STATISTICS, sweep.statistics()))
        outliers = SpQRExtras.from_mask(values[:, inv], outlier[:, inv])
        extras = SpQRExtras({**statistics, **outliers.tensors})
        result = QuantResult(
            codes[:, inv], sweep.scales.half(), sweep.zeros.int(), g_idx, 0.0, self.grid.name, extras=extras
        )
        result.loss = output_error(weight, result.weight(), stats.h)
        return result


class _Sweep:
    """One weight's GPTQ sweep in processing order, with SpQR's group fits and outliers."""

    def __init__(self, method: SpQR, w: torch.Tensor, u: torch.Tensor, threshold: float, gs: int):
        self.grid: UniformGrid = method.grid
        self.options: SpQROptions = method.options
        self.w, self.u, self.threshold, self.gs = w, u, threshold, gs
        out, n_in = w.shape
        groups = n_in // gs
        self.scales = torch.empty(groups, out, device=w.device)
        self.zeros = torch.empty(groups, out, device=w.device)
        self.codes2: list[tuple[torch.Tensor, ...]] = []

    def statistics(self) -> tuple[torch.Tensor, ...]:
        return tuple(torch.cat(parts) for parts in zip(*self.codes2))

    def run(self, block_size: int):
        w, u, gs = self.w, self.u, self.gs
        out, n_in = w.shape
        codes = torch.empty(out, n_in, dtype=torch.uint8, device=w.device)
        outlier = torch.zeros(out, n_in, dtype=torch.bool, device=w.device)
        values = torch.zeros(out, n_in, device=w.device)
        for i1 in range(0, n_in, block_size):
            i2 = min(i1 + block_size, n_in)
            w1 = w[:, i1:i2].clone()
            err1 = torch.zeros_like(w1)
            u1 = u[i1:i2, i1:i2]
            for i in range(i2 - i1):
                col = i1 + i
                if col % gs == 0:  # the group's fit from the weights as updated so far
                    current = torch.cat([w1[:, i:], w[:, i2 : col + gs]], dim=1)[:, :gs]
                    self.fit(col // gs, current, u.diagonal()[col : col + gs])
                s, z = self.scales[col // gs], self.zeros[col // gs]
                x = w1[:, i]
                q = self.grid.quantize(x, s, z)
                d = u1[i, i]
                is_outlier = ((x - self.grid.dequantize(q, s, z)) / d).square() > self.threshold
                kept = x.half().float()
                q = torch.where(is_outlier, z, q)
                codes[:, col], outlier[:, col], values[:, col] = q, is_outlier, kept
                e = (x - torch.where(is_outlier, kept, self.grid.dequantize(q, s, z))) / d
                w1[:, i:].addr_(e, u1[i, i:], alpha=-1)
                err1[:, i] = e
            w[:, i2:] -= err1 @ u[i1:i2, i2:]
        return codes, outlier, values

    def fit(self, g: int, group: torch.Tensor, diag: torch.Tensor) -> None:
        """Group ``g``'s scales (quantized on the second level) and integer zero points, fitted
        without its outlier candidates."""
        if math.isfinite(self.threshold):
            candidates = self.leave_one_out_gain(group, diag) > self.threshold
            # The grid's range always holds 0, so a candidate set to 0 drops out of the fit.
            group = torch.where(candidates, torch.zeros_like(group), group)
        if self.grid.clip_search:  # each row's clip ratio with the least weight error (Grid.params)
            fitted, zero = self.grid.params(group)
            low = -zero * fitted  # the clipped range's low end
        else:
            fitted, _ = self.grid.raw_params(group)
            low = group.amin(dim=1).clamp(max=0)
        stats = quantize_scales(fitted.clamp(min=MIN_SCALE), self.options.stats_bits, self.options.stats_group)
        self.codes2.append(tuple(t[None] for t in stats))
        scale = scales_from_statistics(*stats).float()
        self.scales[g] = scale
        if self.grid.sym:
            self.zeros[g] = (self.grid.maxq + 1) // 2
        else:
            self.zeros[g] = torch.round(-low / scale).clamp(0, self.grid.maxq)

    def leave_one_out_gain(self, group: torch.Tensor, diag: torch.Tensor) -> torch.Tensor:
        """[rows, gs]: how much the group's Hessian-weighted squared error drops when each weight is
        left unquantized and the row's grid is fitted to the others. The grid's range is the row's
        min and max with 0, so leaving out a weight that is neither changes no parameter (the gain
        is its own error), and leaving out the min or the max is fitting the row with it set to 0."""
        err = self._error(group, diag)
        base = err.sum(dim=1)
        gain = err.clone()
        rows = torch.arange(group.shape[0], device=group.device)
        for extreme in (group.argmin(dim=1), group.argmax(dim=1)):
            zeroed = group.clone()
            zeroed[rows, extreme] = 0
            e = self._error(zeroed, diag)
            gain[rows, extreme] = base - (e.sum(dim=1) - e[rows, extreme])
        return gain

    def _error(self, w: torch.Tensor, diag: torch.Tensor) -> torch.Tensor:
        scale, zero = self.grid.raw_params(w)
        scale = scale.clamp(min=MIN_SCALE)[:, None]
        return ((self.grid.fake_quantize(w, scale, zero[:, None]) - w) / diag).square()


METHOD = SpQR
