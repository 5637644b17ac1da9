"""GPTQ (Frantar et al., 2022): quantize columns one at a time and push each column's error onto the
columns not yet quantized, weighted by the inverse Hessian of the layer's inputs."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..reproducible import single_threaded
from . import gptq_columns
from .base import InputStats, Method, QuantResult, output_error

log = logging.getLogger(__name__)

MAX_DAMP = 1.0


@dataclass
class _Prepared:
    """What every module of one subset shares: dead channels, column order, and chol(H^-1)^T."""

    dead: torch.Tensor
    perm: torch.Tensor | None
    hinv_upper: torch.Tensor
    damp: float


def _prepare(h: torch.Tensor, desc_act: bool, damp_percent: float) -> _Prepared:
    with single_threaded():  # LAPACK's rounding depends on its thread count (treeq.reproducible)
        return _factor(h, desc_act, damp_percent)


def _factor(h: torch.Tensor, desc_act: bool, damp: float) -> _Prepared:
    diag = torch.diag(h)
    dead = diag == 0
    # A channel that never fires carries no information; a unit diagonal keeps H invertible.
    diag = torch.where(dead, torch.ones_like(diag), diag)
    perm = torch.argsort(diag, descending=True) if desc_act else None
    if perm is not None:
        diag = diag[perm]
    mean_diag = torch.mean(diag)
    # Each step overwrites its input (LAPACK works in place), so besides the caller's H one n x n
    # matrix is alive (n = 5632 on a 2048-wide Llama's down_proj: 127 MB).
    while True:
        a = h[perm[:, None], perm] if perm is not None else h.clone()
        a.diagonal().copy_(diag + damp * mean_diag)
        _, info = torch.linalg.cholesky_ex(a, out=(a, torch.empty((), dtype=torch.int32)))
        if info == 0:
            torch.cholesky_inverse(a.tril_(), out=a)
            _, info = torch.linalg.cholesky_ex(a, upper=True, out=(a, torch.empty((), dtype=torch.int32)))
            if info == 0:
                break
        del a
        if damp >= MAX_DAMP:
            raise RuntimeError(
                f"Hessian stayed singular up to damp_percent={MAX_DAMP}: calibration inputs are degenerate"
            )
        log.warning("Cholesky failed with damp_percent=%.3f; retrying with more damping", damp)
        damp = min(MAX_DAMP, damp + 0.01 if damp < 0.1 else damp * 2)
    return _Prepared(dead, perm, a.triu_(), damp)


def _sweep(grid, w1, u1, begin: int, end: int, group, scales, zeros, codes, err1) -> None:
    """Columns begin .. end of the block ``w1``: quantize each with its group's params and push its
    error over the pivot onto the block's later columns (:func:`.gptq_columns.sweep` has the
    arguments; that native loop where it runs, else the same in torch)."""
    if gptq_columns.sweep(grid, w1, u1, begin, end, group, scales, zeros, codes, err1):
        return
    # Python ints: a tensor index would make every column's params a gather, not a view.
    # The update is a product, then a difference, as in the native loop. torch's addr_ fuses them
    # in its vector chunks (16 or 32 columns, by ATen's CPU capability) but not in their remainder,
    # so its rounding would depend on the CPU.
    for i, g in zip(range(begin, end), group[begin:end].tolist()):
        s, z = scales[g], zeros[g]
        q = grid.quantize(w1[:, i], s, z)
        codes[:, i] = q
        e = (w1[:, i] - grid.dequantize(q, s, z)) / u1[i, i]
        w1[:, i:].sub_(torch.outer(e, u1[i, i:]))
        err1[:, i] = e


class GPTQOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # On by default: on SmolLM2 4-bit it cut GPTQ's perplexity increase by ~40% (see bench/).
    desc_act: bool = Field(True, description="act-order: quantize columns by decreasing Hessian diagonal")
    static_groups: bool = Field(False, description="with desc_act, fix group params before the sweep")
    damp_percent: float = Field(0.01, gt=0, lt=1, description="damping added to H's diagonal, as its mean's share")
    block_size: int = Field(128, gt=0, description="columns updated together (lazy batch updates)")


class GPTQ(Method):
    name = "gptq"
    Options = GPTQOptions
    # On SmolLM2 4-bit g64 it cut GPTQ's perplexity increase from 0.60 to 0.51 of RTN's, for ~20%
    # more quantization time (bench/results/quantize_smollm2.md).
    default_clip_search = True

    @classmethod
    def reorders_columns(cls, options: GPTQOptions) -> bool:
        return options.desc_act and not options.static_groups

    def quantize(self, weight: torch.Tensor, stats: InputStats) -> QuantResult:
        cfg = self.options
        prep: _Prepared = stats.cached("gptq", lambda: _prepare(stats.h, cfg.desc_act, cfg.damp_percent))
        grid = self.grid.for_weight(weight)
        w = grid.prepare(weight.float()).clone()
        out, n_in = w.shape
        gs = self.group_size(n_in)
        n_groups = n_in // gs
        w[:, prep.dead] = 0
        perm = prep.perm
        identity = torch.arange(n_in, device=w.device)
        order = perm if perm is not None else identity

        scales = torch.empty(n_groups, out, device=w.device)
        zeros = torch.empty(n_groups, out, device=w.device)
        # Which group each column (in processing order) belongs to.
        if cfg.static_groups or perm is None:
            for g in range(n_groups):
                scales[g], zeros[g] = grid.params(w[:, g * gs : (g + 1) * gs])
            group_of = order // gs
            fixed = True
        else:
            group_of = identity // gs
            fixed = False

        if perm is not None:
            w = w[:, perm]
        codes = torch.empty(out, n_in, dtype=torch.uint8, device=w.device)
        u = prep.hinv_upper
        for i1 in range(0, n_in, cfg.block_size):
            i2 = min(i1 + cfg.block_size, n_in)
            w1 = w[:, i1:i2].clone()
            err1 = torch.zeros_like(w1)
            u1 = u[i1:i2, i1:i2]
            i = 0
            while i < i2 - i1:  # a run of columns at a time, up to the next group without params
                col = i1 + i
                stop = i2 - i1
                if not fixed:
                    # The group's params come from the weights as GPTQ has updated them so far.
                    if col % gs == 0:
                        current = torch.cat([w1[:, i:], w[:, i2 : col + gs]], dim=1)[:, :gs]
                        scales[col // gs], zeros[col // gs] = grid.params(current)
                    stop = min(stop, (col // gs + 1) * gs - i1)
                _sweep(grid, w1, u1, i, stop, group_of[i1:i2], scales, zeros, codes[:, i1:], err1)
                i = stop
            w[:, i2:] -= err1 @ u[i1:i2, i2:]

        g_idx = group_of.to(torch.int32)
        if perm is not None:
            inv = torch.argsort(perm)
            codes, g_idx = codes[:, inv], g_idx[inv]
        result = QuantResult(codes, scales.half(), zeros.int(), g_idx, loss=0.0, grid=self.grid.name)
        result.loss = output_error(weight, result.weight(), stats.h)
        return result


METHOD = GPTQ
