"""What a kind of weight extras provides: named tensors of any shape, and how they enter the weight.

Two sorts. An *additive* kind adds a term to the dense GPTQ-layout weight (a sparse residual):
the four GPTQ tensors alone are a layer any dense kernel runs, and ``QuantLinear`` adds
:meth:`WeightExtras.matmul` to the kernel's output unless the kernel computes the kind itself. Any
other kind replaces how the weight is dequantized; only kernels that list it in ``Kernel.extras``
run its layers (the reference kernel runs every kind through :meth:`WeightExtras.dequantize`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from ..numerics import dequantize_grouped


class WeightExtras(ABC):
    kind: ClassVar[str]  # recorded in LinearFormat.extras and matched by Kernel.extras
    names: ClassVar[tuple[str, ...]]  # the tensors' buffer names, every one present
    additive: ClassVar[bool] = False

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = dict(tensors)

    def dequantize(
        self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor, grid: str
    ) -> torch.Tensor:
        """The layer's fp32 weight [out, in] (before any input transform) from the GPTQ tensors and
        these; an additive kind's is the dense weight with its term added (:meth:`add_to`)."""
        if not self.additive:
            raise NotImplementedError(f"{self.kind}: a non-additive kind defines its own dequantize")
        return self.add_to(dequantize_grouped(codes, scales, zeros, g_idx, grid))

    def add_to(self, weight: torch.Tensor) -> torch.Tensor:
        """An additive kind's term added into the fp32 weight [out, in] (in place; returned)."""
        raise NotImplementedError

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """An additive kind's term applied to inputs [tokens, in]: [tokens, out] in fp32."""
        raise NotImplementedError

    @abstractmethod
    def describe(self, in_features: int, out_features: int) -> str:
        """A few words for the per-module table and ``treeq inspect`` (what share is kept how)."""

    def to(self, device) -> "WeightExtras":
        return type(self)({n: t.to(device) for n, t in self.tensors.items()})
