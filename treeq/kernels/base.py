"""What a kernel declares about itself, and the format of one quantized linear it is asked to run."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import TreeqError
from ..extras import EXTRAS
from ..numerics import INTEGER_ZERO_GRIDS, UniformGrid
from ..schemes import ActivationScheme


@dataclass(frozen=True)
class LinearFormat:
    bits: int
    group_size: int  # -1: one group per row
    sym: bool
    desc_act: bool
    in_features: int
    out_features: int
    grid: str = UniformGrid.name  # a name in treeq.numerics.GRIDS
    # How the layer's input is quantized before the matmul; None: not at all. Weight-only kernels
    # get inputs already fake-quantized; a kernel with ``integer_inputs`` quantizes them itself.
    activation: ActivationScheme | None = None
    # The kind of weight extras the layer holds (a name in treeq.extras.EXTRAS); None: none.
    extras: str | None = None


class Kernel(ABC):
    """A matmul for packed weights. Capabilities are class attributes; ``None`` means any."""

    name: ClassVar[str]
    priority: ClassVar[int] = 0  # higher wins among kernels that fit
    bits: ClassVar[frozenset[int] | None] = None
    group_sizes: ClassVar[frozenset[int] | None] = None
    devices: ClassVar[frozenset[str] | None] = None
    dtypes: ClassVar[frozenset[torch.dtype] | None] = None
    supports_asym: ClassVar[bool] = True
    supports_desc_act: ClassVar[bool] = True
    in_multiple: ClassVar[int] = 1  # in_features must be a multiple of this
    out_multiple: ClassVar[int] = 1
    # Grids this kernel dequantizes exactly. The default is those whose dequantization is the classic
    # (code - zero) * scale with an integer zero point; a kernel declares others once it runs them.
    grids: ClassVar[frozenset[str] | None] = INTEGER_ZERO_GRIDS
    # True for kernels that multiply integer inputs: they quantize the input themselves (exactly as
    # treeq.numerics does) and accept only layers whose activation scheme they implement.
    integer_inputs: ClassVar[bool] = False
    # Kinds of weight extras (treeq.extras) that replace the dense dequantization which this kernel
    # runs; None: every kind. An additive kind's term is never the kernel's: QuantLinear adds it to
    # the output of whichever kernel runs the dense tensors.
    extras: ClassVar[frozenset[str] | None] = frozenset()

    @classmethod
    def rejects(cls, fmt: LinearFormat, device: str, dtype: torch.dtype) -> str | None:
        """Why this kernel cannot run ``fmt`` on ``device`` with ``dtype``; None when it can."""
        if cls.bits is not None and fmt.bits not in cls.bits:
            return f"bits={fmt.bits} not in {sorted(cls.bits)}"
        if cls.group_sizes is not None and fmt.group_size not in cls.group_sizes:
            return f"group_size={fmt.group_size} not in {sorted(cls.group_sizes)}"
        if cls.devices is not None and device not in cls.devices:
            return f"device {device} not in {sorted(cls.devices)}"
        if cls.dtypes is not None and dtype not in cls.dtypes:
            return f"dtype {dtype} not supported"
        if not fmt.sym and not cls.supports_asym:
            return "asymmetric zero points not supported"
        if fmt.desc_act and not cls.supports_desc_act:
            return "act-order (g_idx) not supported"
        if fmt.in_features % cls.in_multiple:
            return f"in_features={fmt.in_features} not a multiple of {cls.in_multiple}"
        if fmt.out_features % cls.out_multiple:
            return f"out_features={fmt.out_features} not a multiple of {cls.out_multiple}"
        if cls.grids is not None and fmt.grid not in cls.grids:
            return f"grid {fmt.grid!r} not supported (runs {', '.join(sorted(cls.grids))})"
        runs_kind = cls.extras is None or fmt.extras in cls.extras
        if fmt.extras is not None and not EXTRAS[fmt.extras].additive and not runs_kind:
            return f"weight extras {fmt.extras!r} not supported"
        return None

    @classmethod
    def prepare(cls, layer) -> None:
        """Build, once when the kernel is chosen, whatever ``forward`` needs beyond the checkpoint
        tensors (a repacked weight, say); it lives on ``layer.kernel_state``, outside the state dict."""
        layer.kernel_state = None

    @staticmethod
    @abstractmethod
    def forward(layer, x: torch.Tensor) -> torch.Tensor:
        """y = x @ W^T + b for the QuantLinear ``layer``."""


def contiguous_groups(g_idx: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(perm, sorted g_idx): perm is None when groups already are contiguous runs."""
    if not bool((g_idx[1:] < g_idx[:-1]).any()):
        return None, g_idx
    perm = torch.argsort(g_idx, stable=True)
    return perm, g_idx[perm]


def grouped_codes(layer, kernel: str) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """(codes [out, in] with every group's channels contiguous, the input permutation that makes
    them so or None, the group width). Fused kernels need contiguous groups, so an act-order
    checkpoint has its input channels permuted once here, and each input the same way."""
    k = layer.in_features
    perm, g_idx = contiguous_groups(layer.g_idx.long())
    gs = k // layer.scales.shape[0]
    if not torch.equal(g_idx, torch.arange(k, device=g_idx.device) // gs):
        raise TreeqError(f"{kernel}: g_idx groups are not all {gs} channels; load with --kernel torch")
    codes = layer.codes()
    return (codes if perm is None else codes[:, perm]), perm, gs


def matmul_2d(
    layer,
    x: torch.Tensor,
    compute_dtype: torch.dtype,
    matmul,
    perm: torch.Tensor | None = None,
    bias_in_product: bool = False,
) -> torch.Tensor:
    """Run ``matmul`` on x flattened to [tokens, in] in ``compute_dtype`` (input channels in
    ``perm``'s order, if given: see :func:`grouped_codes`); add the bias; restore x's leading shape
    and dtype. The fused CPU kernels are fast only in bf16, so they compute there.

    ``bias_in_product``: ``matmul`` takes the bias (in ``compute_dtype``, or None) as a second
    argument and adds it within its product, as ``F.linear`` with a bias does. A GEMM that starts
    from the bias rounds differently from one whose result the bias is added to (seen on Zen 4's
    fp32 GEMM, not on an AMX Xeon's), so the kernels that promise the reference kernel's output bit
    for bit take this.

    Each torch call that changes nothing is skipped: a call costs a few microseconds (and over ten
    once other work has evicted the dispatcher's data from the caches), as much as a decoding
    step's whole matmul on a small layer."""
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    if x2.dtype != compute_dtype:
        x2 = x2.to(compute_dtype)
    if not x2.is_contiguous():  # a slice or a transposed view: the fused ops read rows in place
        x2 = x2.contiguous()
    x2 = x2 if perm is None else x2.index_select(1, perm)
    if bias_in_product:
        y = matmul(x2, None if layer.bias is None else layer.bias.to(compute_dtype))
    else:
        y = matmul(x2)
        if layer.bias is not None:
            y = y + layer.bias.to(y.dtype)
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1])
