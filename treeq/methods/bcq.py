"""Binary-coding quantization (BCQ, the weights LUT-GEMM runs): each (row, group) of the weight is
offset + sum_i alpha_i b_i over q = ``bits`` bit-planes, fitted by :func:`treeq.bcq.fit_rows`
(greedy or uniform start, then ``rounds`` of alternating least-squares alphas and optimal signs).
With an offset, each output row ends on whichever of that fit and RTN's asymmetric grid has the
lower output error under the calibration inputs.

With ``error_feedback`` the columns are rounded one at a time in GPTQ's way: each group's alphas are
fitted to the weights as the sweep has updated them when it reaches the group, each column takes
its nearest level, and its error, weighted by chol(H^-1), moves onto the columns not yet rounded.
The layout is not GPTQ's: the result carries :class:`treeq.extras.bcq.BCQExtras`.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from .. import bcq
from ..errors import TreeqError
from ..extras.bcq import BCQExtras
from ..numerics import SCALE_DTYPE, UniformGrid, make_grid
from .base import InputStats, Method, QuantResult, output_error, row_output_errors
from .gptq import _prepare, _Prepared


class BCQOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    rounds: int = Field(10, ge=0, description="alternating refinements of alphas and bits after the start fit")
    offset: bool = Field(
        True,
        description="a per-group offset beside the alphas (a uniform grid is BCQ with one; rows where RTN's "
        "asymmetric grid has the lower output error keep it)",
    )
    error_feedback: bool = Field(False, description="round column by column, moving errors GPTQ's way")
    damp_percent: float = Field(0.01, gt=0, lt=1, description="with error_feedback: damping of H's diagonal")


class BCQ(Method):
    name = "bcq"
    Options = BCQOptions
    grids = (UniformGrid.name,)  # recorded only: BCQExtras dequantizes, not the grid
    bits = bcq.PLANES
    adds_weight_extras = True

    def quantize(self, weight: torch.Tensor, stats: InputStats) -> QuantResult:
        cfg, planes = self.options, self.scheme.bits
        n_in = weight.shape[1]
        gs = self.group_size(n_in)
        bcq.check_shape(n_in, gs, planes)
        if cfg.error_feedback:
            prep: _Prepared = stats.cached("gptq", lambda: _prepare(stats.h, False, cfg.damp_percent))
            fitted = self._sweep(weight, prep, gs)
        else:
            fitted = bcq.fit(weight, planes, gs, cfg.rounds, cfg.offset)
        if cfg.offset:
            fitted = self._uniform_where_better(weight, fitted, stats.h)
        extras, codes, scales = BCQExtras.of(fitted)
        result = QuantResult(
            codes=codes,
            scales=scales,
            zeros=torch.full(scales.shape, 2 ** (planes - 1), dtype=torch.int32),
            g_idx=torch.arange(n_in, dtype=torch.int32) // gs,
            loss=0.0,
            extras=extras,
        )
        result.loss = output_error(weight, result.weight(), stats.h)
        return result

    def _uniform_where_better(self, weight: torch.Tensor, fitted: bcq.BCQWeight, h: torch.Tensor) -> bcq.BCQWeight:
        """Each output row whose RTN asymmetric grid (BCQ with an offset holds it exactly) has the
        lower output error takes that grid. The fits above minimise each group's weight error, not
        the row's output error under H, so some rows came out worse than plain RTN (whole modules
        did on SmolLM2 at 3 bits); rows are independent, so choosing per row makes every module's
        loss at most RTN's on the same inputs."""
        grid = make_grid(UniformGrid.name, self.scheme.bits, sym=False, clip_search=bool(self.scheme.clip_search))
        rtn = self.round(weight, grid)
        try:
            uniform = bcq.from_uniform(rtn.codes, rtn.scales, rtn.zeros, grid.bits, fitted.group_size, grid.offset)
        except TreeqError:  # a scale whose half fp16 cannot hold: RTN is not a candidate here
            return fitted
        better = row_output_errors(weight, uniform.dequantize(), h) < row_output_errors(weight, fitted.dequantize(), h)
        return bcq.take_rows(fitted, uniform, better)

    def _sweep(self, weight: torch.Tensor, prep: _Prepared, gs: int) -> bcq.BCQWeight:
        """GPTQ's column sweep onto BCQ levels, lazily updating the columns past each group."""
        cfg, planes = self.options, self.scheme.bits
        w = weight.float().clone()
        w[:, prep.dead] = 0
        out, n_in = w.shape
        u = prep.hinv_upper
        alphas, offsets, signs = [], [], torch.empty(planes, out, n_in, dtype=torch.bool)
        for g0 in range(0, n_in, gs):
            g1 = g0 + gs
            a, o, _ = bcq.fit_rows(w[:, g0:g1], planes, cfg.rounds, cfg.offset)
            alphas.append(a)
            offsets.append(o)
            err = torch.empty(out, gs)
            for j in range(g0, g1):
                s = bcq.nearest_signs(w[:, j : j + 1], a, o)
                signs[:, :, j] = s[:, :, 0]
                err[:, j - g0] = (w[:, j] - bcq.combine(o, a, s[:, :, 0])) / u[j, j]
                w[:, j:g1].addr_(err[:, j - g0], u[j, j:g1], alpha=-1)
            w[:, g1:] -= err @ u[g0:g1, g1:]
        return bcq.BCQWeight(
            planes=bcq.pack_planes(signs),
            alphas=torch.stack(alphas, dim=1).to(SCALE_DTYPE),
            offsets=torch.stack(offsets),
            group_size=gs,
        )


METHOD = BCQ
