"""Which method instance quantizes each module.

The config's method runs on each module's own weight scheme (the first override matching the
module's name, else the config's scheme); modules whose statistics saw too few calibration tokens
get the fallback method on the same scheme; modules an override skips get none and stay in full
precision. The engine asks by module name and never learns why. The plan also holds the scale
migration, if any, that runs on each layer first.
"""

from __future__ import annotations

import torch

from ..config import QuantConfig
from ..methods import InputStats, Method, make_method
from ..runtime.activations import ActivationQuantizer, input_quantizer
from ..schemes import WeightScheme
from ..transforms import TRANSFORMS, ScaleMigration


class MethodPlan:
    def __init__(self, config: QuantConfig):
        self.config = config
        # The fallback's options are not the main method's (RTN takes none).
        self._fallback_config = config.model_copy(update={"method": config.calibration.fallback_method, "options": {}})
        self._made: dict[tuple[str, WeightScheme], Method] = {}
        self.default = self._method(config, config.weights)
        name = config.scale_migration()
        # Run on each layer before its modules are quantized, whatever the method.
        self.migration: ScaleMigration | None = TRANSFORMS[name](config.migration_options) if name else None

    def scheme(self, module: str) -> WeightScheme | None:
        """``module``'s weight scheme (full module name); None: left in full precision."""
        return self.config.scheme_of(module)

    def method(self, module: str, fallback: bool = False) -> Method | None:
        scheme = self.scheme(module)
        if scheme is None:
            return None
        return self._method(self._fallback_config if fallback else self.config, scheme)

    def _method(self, config: QuantConfig, scheme: WeightScheme) -> Method:
        # One instance per (method, scheme): instances may cache per-scheme work.
        key = (config.method, scheme)
        if key not in self._made:
            self._made[key] = make_method(config, scheme)
        return self._made[key]

    def input_quantizer(
        self, module: str, stats: InputStats, scales: torch.Tensor | None = None
    ) -> ActivationQuantizer | None:
        """What quantizes ``module``'s input once the module is quantized (the config's activation
        scheme, static levels calibrated on the range in ``stats``, of the input divided by
        ``scales`` if given); None: inputs stay as they are (weight-only, or a module left in full
        precision)."""
        scheme = self.config.activations
        if scheme is None or self.scheme(module) is None:
            return None
        quantizer = input_quantizer(scheme, stats.low.shape[0])
        if scheme.dynamic:
            return quantizer
        low, high = (stats.low, stats.high) if scales is None else (stats.low / scales, stats.high / scales)
        return quantizer.calibrate(low, high)
