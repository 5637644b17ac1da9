"""The contract of a scale migration: per-input-channel scales for one subset, from its inputs.

The engine calls :meth:`ScaleMigration.scales` with the fp weights of a subset (every module that
reads the same input), that input's statistics, and the rounding of the subset's weight scheme; it
then folds the scales s in: the weights become W diag(s), the feeding op's output is divided by s.
A migration never sees the model, the method or the checkpoint format.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, ClassVar

import pydantic
import torch

from ..errors import parse_settings
from ..methods.base import InputStats

# The grid rounding of a weight in the subset's scheme: w -> its fake-quantized (dequantized) value.
RoundWeight = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class InputSample:
    """Rows of a subset's calibration input, for migrations that judge scales on real inputs, and
    what the subset's input quantizer makes of inputs divided by scales s: ``quantize(x, s)``
    (levels calibrated on the divided range where they are static); None for weight-only schemes."""

    rows: torch.Tensor  # [n, in_features], fp32
    quantize: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None


class ScaleMigration(ABC):
    name: ClassVar[str]
    # The pydantic model that validates ``QuantConfig.migration_options``; None: no settings.
    Options: ClassVar[type[pydantic.BaseModel] | None] = None

    def __init__(self, options: dict):
        self.options = self.parse_options(options)

    def sample_rows(self) -> int:
        """Rows of each subset's input :meth:`scales` wants as an :class:`InputSample`; 0: none."""
        return 0

    @classmethod
    def parse_options(cls, options: dict) -> pydantic.BaseModel | None:
        """Validated options; raises ValueError naming ``migration_options.<field>`` and what is allowed."""
        return parse_settings(cls.Options, options, "migration_options", f"migration {cls.name!r}")

    @abstractmethod
    def scales(
        self,
        weights: list[torch.Tensor],
        stats: InputStats,
        round_weight: RoundWeight,
        sample: InputSample | None = None,
    ) -> torch.Tensor:
        """Positive scales [in_features] for the subset whose fp ``weights`` read inputs with
        ``stats``; ``sample`` where :meth:`sample_rows` asks for one."""


def centred(s: torch.Tensor) -> torch.Tensor:
    """``s`` divided by its geometric mid-range, so neither side of the fold grows large."""
    return s / (s.max() * s.min()).sqrt()
