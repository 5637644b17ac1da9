"""GPTQ's two zero-point conventions, and what a GPTQ quantization_config says about them.

GPTQ v1 (``format: gptq``, what AutoGPTQ wrote and most published checkpoints hold) stores each
zero point minus one; v2 (``gptq_v2``) stores it as is. The codes, scales and g_idx are the same.
v1 cannot hold a zero point of 0, which asymmetric grids produce, so treeq writes v1 only for
symmetric checkpoints (zero point = the middle code) and v2 for everything else.
"""

from __future__ import annotations

from typing import Callable

import torch

from . import packing
from .errors import TreeqError

V1 = "gptq"
V2 = "gptq_v2"
VERSIONS = (V1, V2)


def _zeros(qzeros: torch.Tensor, bits: int) -> torch.Tensor:
    return packing.unpack(qzeros.T.contiguous(), bits).T.to(torch.int64)


def _packed_zeros(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    return packing.pack(zeros.T.contiguous(), bits).T.contiguous()


def _qzeros_keys(tensors: dict[str, torch.Tensor]) -> list[str]:
    return [k for k in tensors if k.endswith(".qzeros")]


def to_v1(tensors: dict[str, torch.Tensor], bits: int | Callable[[str], int]) -> dict[str, torch.Tensor]:
    """A state dict with v2 zero points -> the same with v1's (zero - 1). ``bits``: every module's,
    or a function of the module's name (per-module overrides)."""
    out = dict(tensors)
    for key in _qzeros_keys(tensors):
        b = _bits(bits, key)
        zeros = _zeros(out[key], b)
        if bool((zeros == 0).any()):
            raise ValueError(f"{key}: a zero point of 0 cannot be written as GPTQ v1; write gptq_v2")
        out[key] = _packed_zeros(zeros - 1, b)
    return out


def _ones(bits: int) -> int:
    """A word with 1 in every whole ``bits``-wide field."""
    return sum(1 << (bits * i) for i in range(packing.WORD_BITS // bits))


def from_v1(tensors: dict[str, torch.Tensor], bits: int | Callable[[str], int]) -> dict[str, torch.Tensor]:
    """Inverse of v1's zero - 1, as GPTQModel undoes it: for 2/4/8 bits one add per word, which also
    undoes the borrow its word-wise subtraction left where a zero point was 0; 3-bit fields
    straddle words, so each is shifted on its own. ``bits`` as for :func:`to_v1`."""
    out = dict(tensors)
    for key in _qzeros_keys(tensors):
        b = _bits(bits, key)
        if packing.WORD_BITS % b:
            out[key] = _packed_zeros((_zeros(out[key], b) + 1) % 2**b, b)
        else:
            words = (out[key].to(torch.int64) + _ones(b)) % 2**packing.WORD_BITS
            out[key] = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return out


def _bits(bits: int | Callable[[str], int], qzeros_key: str) -> int:
    return bits if isinstance(bits, int) else bits(qzeros_key[: -len(".qzeros")])


def stored_version(qcfg: dict) -> str:
    """The zero-point convention a GPTQ checkpoint was written in. GPTQModel reads ``format`` and
    takes ``checkpoint_format`` as its older name; neither means v1. treeq's checkpoints from before
    ``meta.zero_points`` was recorded said ``format: gptq`` beside ``checkpoint_format: gptq_v2``
    and meant v2, so for those the latter wins."""
    fmt, legacy = qcfg.get("format"), qcfg.get("checkpoint_format")
    own_legacy = "treeq_version" in qcfg.get("meta", {}) and "zero_points" not in qcfg.get("meta", {})
    version = legacy if (own_legacy and legacy) else (fmt or legacy or V1)
    if version not in VERSIONS:
        raise TreeqError(f"GPTQ checkpoint format {version!r} is not supported; treeq reads {' and '.join(VERSIONS)}")
    return version
