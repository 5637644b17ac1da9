"""Checkpoint formats, one file each; each file defines ``FORMAT``, a :class:`CheckpointFormat`.

Adding a format means adding a file here: the writer picks it by ``WeightScheme.format``, the
loader by the ``quant_method`` of a checkpoint's quantization_config.
"""

from __future__ import annotations

from ..errors import TreeqError
from ..registry import discover
from .base import CheckpointFormat, FormatSummary

FORMATS: dict[str, CheckpointFormat] = {f.name: f for f in discover(__name__, __path__, "FORMAT")}
FORMAT_NAMES = tuple(FORMATS)


def reading(qcfg: dict) -> CheckpointFormat:
    """The format that reads a stored quantization_config."""
    method = qcfg.get("quant_method")
    for fmt in FORMATS.values():
        if method in fmt.quant_methods:
            return fmt
    known = sorted(m for f in FORMATS.values() for m in f.quant_methods)
    raise TreeqError(f"quant_method {method!r} is not a format treeq reads ({', '.join(known)})")


__all__ = ["FORMATS", "FORMAT_NAMES", "CheckpointFormat", "FormatSummary", "reading"]
