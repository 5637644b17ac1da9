"""An optional transform a quantized linear applies to its input before the matmul.

``x -> rotate(x / channel_scales)``: per-input-channel scales (AWQ-style methods use only these),
optionally followed by pairwise rotations (:mod:`treeq.rotation`). A method that quantizes
``Q = quant(R(W diag(s)))`` stores Q as usual plus this transform; the layer then computes
``y = transform(x) @ dequant(Q)^T``, which equals ``x @ W_hat^T`` with the effective dense weight
``W_hat = R^-1(dequant(Q)) / s`` that the looper installs for calibrating later layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import rotation


@dataclass
class InputTransform:
    channel_scales: torch.Tensor  # fp32 [in]
    pairs: torch.Tensor | None = None  # int16 [krot, in]
    theta: torch.Tensor | None = None  # fp32 [krot, in / 2]
    group_size: int = 0  # channels per rotation group

    @property
    def krot(self) -> int:
        return 0 if self.pairs is None else self.pairs.shape[0]

    def describe(self) -> dict:
        """What ``quantization_config`` records about the transform."""
        out: dict = {"channel_scales": True}
        if self.krot:
            out["rotation"] = {"kind": "pairwise_givens", "krot": self.krot, "group_size": self.group_size}
        return out

    def buffers(self) -> dict[str, torch.Tensor]:
        out = {"channel_scales": self.channel_scales.float()}
        if self.krot:
            out.update(pairs=self.pairs.to(torch.int16), theta=self.theta.float())
        return out

    def effective_weight(self, quantized: torch.Tensor) -> torch.Tensor:
        """The dense weight in the original input basis: R^-1 applied to rows, then columns / s."""
        w = quantized.float()
        if self.krot:
            w = rotation.rotate(w, self.pairs, self.theta.float(), self.group_size, inverse=True)
        return w / self.channel_scales.float()


def apply_input_transform(
    x: torch.Tensor,
    channel_scales: torch.Tensor,
    pairs: torch.Tensor | None,
    theta: torch.Tensor | None,
    group_size: int,
) -> torch.Tensor:
    """``rotate(x / channel_scales)`` in ``x``'s dtype; rotations use the Triton kernel on GPU."""
    x = x / channel_scales.to(x.dtype)
    if pairs is None or pairs.shape[0] == 0:
        return x
    if x.is_cuda:
        from .kernels.triton_rotation import triton_available, triton_rotate

        if triton_available():
            return triton_rotate(x, pairs, theta, group_size)
    return rotation.rotate(x, pairs, theta.float(), group_size).to(x.dtype)
