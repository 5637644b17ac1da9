"""An optional transform a quantized linear applies to its input before the matmul.

``x -> rotate(x / channel_scales)``: per-input-channel scales (AWQ-style methods use only these),
optionally followed by pairwise rotations (:mod:`treeq.runtime.rotation`). A method that quantizes
``Q = quant(R(W diag(s)))`` stores Q as usual plus this transform; the layer then computes
``y = transform(x) @ dequant(Q)^T``, which equals ``x @ W_hat^T`` with the effective dense weight
``W_hat = R^-1(dequant(Q)) / s`` that the looper installs for calibrating later layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import rotation

# The buffers any input transform may store per module, as named in checkpoints.
BUFFERS = ("channel_scales", "pairs", "theta")
# A recorded rotation group size meaning "each module's weight group" (its width where group_size is
# -1), so modules of different widths share one record (ParoQuant rotates within its weight groups).
WEIGHT_GROUPS = "weights"


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

    @staticmethod
    def explain(described: dict) -> str:
        """:meth:`describe`'s record as a line for ``treeq inspect``."""
        steps = ["x / channel_scales"]
        rot = described.get("rotation")
        if rot:
            groups = "each module's weight groups" if rot["group_size"] == WEIGHT_GROUPS else rot["group_size"]
            steps.append(f"{rot['krot']} layers of pairwise rotations in groups of {groups}")
        return ", then ".join(steps)

    def buffers(self) -> dict[str, torch.Tensor]:
        out = {"channel_scales": self.channel_scales.float()}
        if self.krot:
            out.update(pairs=self.pairs.to(torch.int16), theta=self.theta.float())
        return out

    @classmethod
    def from_buffers(cls, buffers: dict[str, torch.Tensor], group_size: int) -> "InputTransform":
        return cls(buffers["channel_scales"], buffers.get("pairs"), buffers.get("theta"), group_size)

    @classmethod
    def stored_for(
        cls, module: str, state: dict, described: dict | None, in_features: int, weight_group: int
    ) -> "InputTransform | None":
        """An empty transform shaped like the one a checkpoint stores for ``module`` (its keys in
        ``state``), to load into; None when the module has none. ``weight_group``: the module's
        weight group width, for a rotation recorded as grouped like the weights."""
        if f"{module}.channel_scales" not in state:
            return None
        pairs = state.get(f"{module}.pairs")
        krot = 0 if pairs is None else pairs.shape[0]
        group_size = (described or {}).get("rotation", {}).get("group_size", 0)
        if group_size == WEIGHT_GROUPS:
            group_size = weight_group
        if not krot:
            return cls(torch.ones(in_features), group_size=group_size)
        zeros = torch.zeros(krot, in_features, dtype=torch.int16), torch.zeros(krot, in_features // 2)
        return cls(torch.ones(in_features), *zeros, group_size)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``rotate(x / channel_scales)`` in ``x``'s dtype; rotations use the Triton kernel on GPU."""
        x = x / self.channel_scales.to(x.dtype)
        if not self.krot:
            return x
        if x.is_cuda:
            from ..kernels.triton_rotation import triton_available, triton_rotate

            if triton_available():
                return triton_rotate(x, self.pairs, self.theta, self.group_size)
        return rotation.rotate(x, self.pairs, self.theta.float(), self.group_size).to(x.dtype)

    def effective_weight(self, quantized: torch.Tensor) -> torch.Tensor:
        """The dense weight in the original input basis: R^-1 applied to rows, then columns / s."""
        w = quantized.float()
        if self.krot:
            w = rotation.rotate(w, self.pairs, self.theta.float(), self.group_size, inverse=True)
        return w / self.channel_scales.float()
