"""Fold per-input-channel scales into a subset and the op that feeds it, leaving the layer's function
unchanged: the subset's weights take W diag(s) and the feeding op's output is divided by s.

Scaling methods (AWQ, later SmoothQuant) choose s; this module applies it to fp weights before
quantization, so the checkpoint needs no extra tensors and every kernel runs it unchanged.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

log = logging.getLogger(__name__)


def _output_channels(op: nn.Module) -> int | None:
    """How many output channels ``op`` can rescale: a linear's rows or a norm's elementwise weight."""
    if isinstance(op, nn.Linear):
        return op.out_features
    weight = getattr(op, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 1:
        return weight.numel()
    return None


def divide_output(op: nn.Module, s: torch.Tensor, norm_weight_offset: float) -> None:
    """op's output /= s. A norm that multiplies by (offset + weight), as Gemma's does, keeps its offset."""
    if isinstance(op, nn.Linear):
        op.weight.data.div_(s[:, None].to(op.weight.dtype))
        if op.bias is not None:
            op.bias.data.div_(s.to(op.bias.dtype))
        return
    w = op.weight.data
    op.weight.data = ((w.float() + norm_weight_offset) / s - norm_weight_offset).to(w.dtype)
    if getattr(op, "bias", None) is not None:
        op.bias.data.div_(s.to(op.bias.dtype))


def can_fold(layer: nn.Module, fed_by: str, in_features: int) -> bool:
    """Whether ``fed_by``'s outputs are the subset's inputs one to one. A GQA value projection feeding
    the output projection is not (heads share value channels), so such subsets are left unscaled."""
    channels = _output_channels(layer.get_submodule(fed_by))
    if channels != in_features:
        log.debug("not scaling inputs fed by %s: %s outputs, %d inputs", fed_by, channels, in_features)
    return channels == in_features


def fold_input_scales(
    layer: nn.Module, modules: tuple[str, ...], fed_by: str, s: torch.Tensor, norm_weight_offset: float = 0.0
) -> None:
    """Scale the inputs of ``modules`` by ``s`` through ``fed_by`` (check :func:`can_fold` first)."""
    divide_output(layer.get_submodule(fed_by), s, norm_weight_offset)
    for name in modules:
        linear = layer.get_submodule(name)
        linear.weight.data.mul_(s[None, :].to(linear.weight.dtype))
