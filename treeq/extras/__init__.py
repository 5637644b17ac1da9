"""Tensors a format keeps beside GPTQ's four (``qweight``, ``qzeros``, ``scales``, ``g_idx``), one
kind per file; each file defines ``EXTRAS``, a :class:`WeightExtras` subclass.

A method returns them on ``QuantResult.extras``; ``QuantLinear`` holds their tensors as buffers
under the names the kind gives them, so checkpoints store them under the module's prefix; the loader
recognises a kind by its tensor names (the kind with the most names, all present, where one kind
extends another). None of these parts names a kind.
"""

from __future__ import annotations

import torch

from ..registry import discover
from .base import WeightExtras

EXTRAS: dict[str, type[WeightExtras]] = {e.kind: e for e in discover(__name__, __path__, "EXTRAS")}
# Every kind's tensor names: the leaf names a quantized linear's stored weight may also have.
NAMES = tuple(dict.fromkeys(n for kind in EXTRAS.values() for n in kind.names))


def stored_for(module: str, state: dict[str, torch.Tensor]) -> WeightExtras | None:
    """The extras a checkpoint's ``state`` holds for ``module`` (its tensors, to be assigned), or None."""
    held = [kind for kind in EXTRAS.values() if all(f"{module}.{n}" in state for n in kind.names)]
    if not held:
        return None
    kind = max(held, key=lambda k: len(k.names))
    return kind({n: state[f"{module}.{n}"] for n in kind.names})


__all__ = ["EXTRAS", "NAMES", "WeightExtras", "stored_for"]
