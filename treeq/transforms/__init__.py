"""Scale migrations, one file each; each file defines ``TRANSFORM``, a :class:`ScaleMigration`.

A scale migration runs before a layer is quantized, whatever the method: it picks per-input-channel
scales for each subset and the engine folds them into the subset's weights and the op that feeds it
(:mod:`treeq.engine.scaling`), so the layer computes the same function on easier numbers.
"""

from __future__ import annotations

from ..registry import discover
from .base import ScaleMigration

TRANSFORMS: dict[str, type[ScaleMigration]] = {t.name: t for t in discover(__name__, __path__, "TRANSFORM")}


__all__ = ["TRANSFORMS", "ScaleMigration"]
