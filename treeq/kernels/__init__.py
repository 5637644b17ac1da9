"""Kernels, one file each; each file defines ``KERNEL``. Selection is a pure function of the
format, device and dtype, so what ``treeq inspect`` predicts is what loading does."""

from __future__ import annotations

import torch

from ..errors import TreeqError
from ..registry import discover
from .base import Kernel, LinearFormat

KERNELS = {k.name: k for k in discover(__name__, __path__, "KERNEL")}


def explain(fmt: LinearFormat, device: str, dtype: torch.dtype) -> dict[str, str | None]:
    """Each kernel's reason for refusing ``fmt`` (None for kernels that accept it)."""
    return {name: k.rejects(fmt, device, dtype) for name, k in KERNELS.items()}


def select_kernel(
    fmt: LinearFormat,
    device: str,
    dtype: torch.dtype,
    force: str | None = None,
    reasons: dict[str, str | None] | None = None,
) -> type[Kernel]:
    """The highest-priority kernel that accepts ``fmt``; ``reasons``: :func:`explain`'s answer, if
    the caller already has it."""
    if force is not None:
        if force not in KERNELS:
            raise TreeqError(f"unknown kernel {force!r}; available: {', '.join(sorted(KERNELS))}")
        reason = KERNELS[force].rejects(fmt, device, dtype)
        if reason:
            raise TreeqError(f"kernel {force!r} cannot run this layer: {reason}")
        return KERNELS[force]
    reasons = explain(fmt, device, dtype) if reasons is None else reasons
    fitting = [KERNELS[n] for n, r in reasons.items() if r is None]
    if not fitting:
        detail = "; ".join(f"{n}: {r}" for n, r in reasons.items())
        raise TreeqError(f"no kernel can run {fmt} on {device}/{dtype}: {detail}")
    return max(fitting, key=lambda k: k.priority)


__all__ = ["KERNELS", "Kernel", "LinearFormat", "explain", "select_kernel"]
