"""Layer-wise knowledge distillation (ZeroQuant's LKD), run on a decoder layer once its modules
are quantized.

The student is the quantized layer: each quantized module's weight starts at its fp value and is
trained through a straight-through fake-quant on the module's own levels (the method's zero
points stay fixed, its scales too unless ``train_scales``, so the result is still a checkpoint of
that method's layout). The teacher is the same layer in full precision; both read the inputs the
looper holds for the layer (what the model quantized so far computes). AdamW minimises the squared
error of the layer's output on all but a held-out share of the calibration batches, its rate
decaying linearly to 0; the trained weights are re-rounded to the levels, and the layer keeps them
only if the error on the held-out batches falls. Input quantizers hooked on the modules pass
gradients straight through while training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
from torch.func import functional_call

from ..config import DistillSettings
from ..methods import QuantResult
from ..numerics import SCALE_DTYPE, UniformGrid, dequantize_grouped, fake_quantize_learned, quantize_grouped


@dataclass(frozen=True)
class DistillRecord:
    layer: int
    before: float  # held-out output error of the quantized layer
    after: float  # the same after training and re-rounding
    kept: bool
    changed_codes: int  # codes that moved, over every module of the layer

    def line(self) -> str:
        verdict = "kept" if self.kept else "discarded (held-out error rose)"
        return (
            f"layer {self.layer} LKD: held-out output error {self.before:.4e} -> {self.after:.4e} "
            f"({self.changed_codes} codes changed), {verdict}"
        )


class _Levels:
    """A module's levels and its trainable weight, which starts at the fp weight: training moves
    it across the rounding boundaries where that lowers the layer's output error. With
    ``train_scales`` each group's scale is learned too (straight through its fp16 rounding, as
    :func:`treeq.numerics.fake_quantize_learned` does); zero points stay the method's.

    Both train in relative units, so one learning rate fits every layer and width: the weight as a
    multiple of its group's (initial) step, the scale as its logarithm. An AdamW step then moves a
    weight by about ``lr`` of a step and a scale by about ``lr`` of itself."""

    def __init__(self, result: QuantResult, bits: int, fp_weight: torch.Tensor, train_scales: bool):
        self.result, self.bits = result, bits
        g = result.g_idx.long()
        self.step = result.scales.float()[g].T  # [out, in]: each weight's group step
        self.units = nn.Parameter(fp_weight.detach().float() / self.step)
        self.log_scales = nn.Parameter(result.scales.float().log()) if train_scales else None

    @property
    def weight(self) -> torch.Tensor:
        return self.units * self.step

    def parameters(self) -> list[nn.Parameter]:
        return [self.units] + ([] if self.log_scales is None else [self.log_scales])

    def fake_quantized(self) -> torch.Tensor:
        """The weight on its levels in the forward pass, the identity's gradient in the backward."""
        r, w = self.result, self.weight
        if self.log_scales is not None:
            g = r.g_idx.long()
            return fake_quantize_learned(w, self.log_scales.exp()[g].T, r.zeros.float()[g].T, 2**self.bits - 1)
        on_levels = dequantize_grouped(self._codes(w.detach(), r.scales), r.scales, r.zeros, r.g_idx, r.grid)
        return w + (on_levels - w).detach()

    def _codes(self, w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        r = self.result
        return quantize_grouped(w, scales, r.zeros, r.g_idx, r.grid, self.bits)

    def rounded(self) -> QuantResult:
        scales = self.result.scales if self.log_scales is None else _stored(self.log_scales.detach().exp())
        return replace(self.result, codes=self._codes(self.weight.detach(), scales), scales=scales)


def _stored(scales: torch.Tensor) -> torch.Tensor:
    """Learned scales as the checkpoint stores them (what fake_quantize_learned trained with)."""
    return scales.clamp(min=1e-5).to(SCALE_DTYPE)


def distill_layer(
    layer: nn.Module,
    index: int,
    results: dict[str, tuple[QuantResult, int, torch.Tensor]],
    inputs: list[torch.Tensor],
    kwargs: list[dict],
    targets: list[torch.Tensor],
    settings: DistillSettings,
) -> tuple[dict[str, QuantResult], DistillRecord]:
    """Train the quantized modules of ``layer`` (``results``: module name in the layer -> (result,
    bits, fp weight)) so its outputs on ``inputs`` match ``targets`` (the fp layer's), and return the
    results to keep (re-rounded, or the given ones where held-out error did not fall) with the
    record. The layer runs in fp32 (no autocast), as ``targets`` were computed. Each module's weight
    is left at its kept result's dequantized value."""
    if transformed := [n for n, (r, *_) in results.items() if r.transform is not None]:
        raise ValueError(f"LKD trains plain weights; {transformed[0]} has an input transform")
    held = max(1, math.ceil(len(inputs) * settings.holdout))
    if held >= len(inputs):
        raise ValueError(f"LKD needs a calibration batch to train on beside {held} held out; add calib_samples")
    train, heldout = range(len(inputs) - held), range(len(inputs) - held, len(inputs))
    if settings.train_scales and (grids := {r.grid for r, *_ in results.values()} - {UniformGrid.name}):
        raise ValueError(f"LKD learns scales of the minmax grid only, not {sorted(grids)}; set train_scales=False")
    levels = {name: _Levels(r, bits, fp, settings.train_scales) for name, (r, bits, fp) in results.items()}

    def error(batches, weights=None) -> float:
        with torch.no_grad():
            return sum(_loss(layer, inputs[b], kwargs[b], targets[b], weights).item() for b in batches) / len(batches)

    before = error(heldout)
    trained = [p for lv in levels.values() for p in lv.parameters()]
    optimizer = torch.optim.AdamW(trained, lr=settings.lr, weight_decay=0.0)
    # Decaying to 0 lets the last steps settle: at a constant rate SmolLM2's held-out error fell
    # by a quarter in 10 steps and climbed back by 30.
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / settings.steps)
    steps = _micro_batches(train, inputs, settings.sequences_per_step)
    with torch.enable_grad():
        for step in range(settings.steps):
            b, rows = steps[step % len(steps)]
            weights = {f"{name}.weight": lv.fake_quantized() for name, lv in levels.items()}
            batch = len(inputs[b])
            loss = _loss(layer, inputs[b][rows], _rows(kwargs[b], rows, batch), targets[b][rows], weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    rounded = {name: lv.rounded() for name, lv in levels.items()}
    after = error(heldout, {f"{n}.weight": r.weight() for n, r in rounded.items()})
    kept = after < before
    chosen = rounded if kept else {name: r for name, (r, *_) in results.items()}
    for name, r in chosen.items():
        layer.get_submodule(name).weight.data = r.weight().to(layer.get_submodule(name).weight.dtype)
    changed = sum(int((rounded[n].codes != r.codes).sum()) for n, (r, *_) in results.items())
    return chosen, DistillRecord(index, before, after, kept, changed)


def _micro_batches(batches: range, inputs: list[torch.Tensor], size: int) -> list[tuple[int, slice]]:
    """(batch, rows) of ``size`` sequences each, over the training batches in order: a step costs
    a few sequences' forward and backward, not a whole calibration batch's."""
    return [(b, slice(i, i + size)) for b in batches for i in range(0, len(inputs[b]), size)]


def _rows(value, rows: slice, batch: int):
    """A layer keyword argument cut to ``rows`` of the batch: tensors (or tuples of them, such as
    rotary position embeddings) whose first dimension is the batch; others (shared across it,
    first dimension 1) as they are."""
    if isinstance(value, dict):
        return {k: _rows(v, rows, batch) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_rows(v, rows, batch) for v in value)
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch and batch > 1:
        return value[rows]
    return value


def _loss(layer, hidden: torch.Tensor, kwargs: dict, target: torch.Tensor, weights) -> torch.Tensor:
    """Mean squared error of the layer's output with ``weights`` (parameter name -> tensor) in
    place of its own, against ``target``."""
    out = functional_call(layer, weights or {}, (hidden,), kwargs)
    out = out[0] if isinstance(out, (tuple, list)) else out
    return torch.mean((out.float() - target.float()) ** 2)
