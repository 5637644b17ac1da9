"""Which KV cache a model runs with: the scheme a checkpoint stored (attached to the model it loads
to), one asked for, or none.

``kv`` as every entry point takes it (``treeq.generate``, ``evaluate_perplexity``, ``run_tasks``):
None follows the model (the checkpoint's stored scheme and calibration, else transformers' own
cache); ``"none"`` turns a stored scheme off; a scheme or preset name replaces it, calibrated on the
given text where it needs calibration, unless it is the stored scheme, whose stored calibration is
reused (calibrating again would measure something else than the checkpoint holds).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from transformers.cache_utils import Cache

from ..schemes import KVCacheScheme
from .kv_calibration import KVCalibration, calibrate_on_text
from .kv_schemes import kv_cache_for

log = logging.getLogger(__name__)

NO_KV = "none"  # --kv none: transformers' cache even where the checkpoint stores a scheme
_ATTRIBUTE = "treeq_kv"  # where a loaded (or just quantized) model carries its stored choice


@dataclass(frozen=True)
class KVChoice:
    scheme: KVCacheScheme | None  # None: transformers' own cache
    calibration: KVCalibration | None = None
    origin: str = "given"

    def cache(self, model) -> Cache | None:
        return None if self.scheme is None else kv_cache_for(model, self.scheme, self.calibration)

    def describe(self) -> str:
        if self.scheme is None:
            return f"transformers' cache ({self.origin})"
        return f"{self.scheme.describe()} ({self.origin})"


def attach_kv(model, scheme: KVCacheScheme | None, calibration: KVCalibration | None, origin: str) -> None:
    """Make ``scheme`` the model's default KV cache (None: leave the model without one)."""
    if scheme is not None:
        setattr(model, _ATTRIBUTE, KVChoice(scheme, calibration, origin))


def stored_kv(model) -> KVChoice | None:
    return getattr(model, _ATTRIBUTE, None)


def choose_kv(model, tokenizer, kv: KVChoice | KVCacheScheme | str | None, calib_text: str = "wiki-train") -> KVChoice:
    """The KV cache ``kv`` asks for on ``model`` (module docstring), logged; a KVChoice already made
    (the CLI makes one for perplexity and tasks alike) is taken as it is."""
    if isinstance(kv, KVChoice):
        return kv
    stored = stored_kv(model)
    if kv is None:
        choice = stored or KVChoice(None, origin="none stored or given")
    elif kv == NO_KV:
        choice = KVChoice(None, origin=f"--kv {NO_KV}" + (": stored scheme turned off" if stored else ""))
    else:
        scheme = KVCacheScheme.named(kv) if isinstance(kv, str) else kv
        if stored is not None and stored.scheme == scheme:
            choice = stored
        else:
            calibration = calibrate_on_text(model, tokenizer, scheme, calib_text)
            origin = "given" + ("" if stored is None else ", replacing the checkpoint's stored scheme")
            choice = KVChoice(scheme, calibration, origin)
    log.info("KV cache: %s", choice.describe())
    return choice
