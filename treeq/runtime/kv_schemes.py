"""The cache a :class:`~treeq.schemes.KVCacheScheme` describes: which quantizer keys and values get."""

from __future__ import annotations

from transformers.cache_utils import Cache

from ..errors import TreeqError
from ..models import spec_for
from ..schemes import KVCacheScheme
from .kivi import MinMaxKV
from .kv_cache import FULL_PRECISION, AttentionShape, IdentityKV, KVQuantizer, attention_shape, quantized_kv_cache
from .kv_calibration import KVCalibration, needs_calibration
from .kvquant import KVQuantKV, check_packable_heads, uniform_levels
from .qrazor_kv import QRazorKV

# Fields a calibration depends on: one made for other values of them does not fit the scheme.
CALIBRATED_FIELDS = ("key_bits", "value_bits", "key_granularity", "group_size", "pre_rope_keys", "levels", "outliers")
CALIBRATED_FIELDS += ("sink_tokens",)


def _minmax(bits: int, granularity: str, scheme: KVCacheScheme, shape: AttentionShape, what: str) -> KVQuantizer:
    per_channel = granularity == "per-channel"
    if not per_channel and shape.head_dim % scheme.group_size:
        raise TreeqError(
            f"{what} per token in groups of {scheme.group_size} channels do not fit head_dim {shape.head_dim}; "
            f"set group_size (--kv-group-size) to a divisor of {shape.head_dim}"
        )
    return MinMaxKV(bits, per_channel, scheme.group_size)


def _kvquant(
    bits: int, granularity: str, scheme: KVCacheScheme, shape: AttentionShape, levels, channels
) -> KVQuantizer:
    group = None if granularity == "per-channel" else scheme.group_size
    check_packable_heads(bits, shape.head_dim, group)
    levels = uniform_levels(bits) if levels is None else levels
    return KVQuantKV(bits, levels, group, channels, scheme.outliers)


def _checked(scheme: KVCacheScheme, calibration: KVCalibration | None) -> KVCalibration | None:
    if not needs_calibration(scheme):
        return None
    if calibration is None:
        raise TreeqError(
            f"{scheme.describe()} needs calibration: pass calibration=calibrate_kv(collect_kv_activations(model, "
            "batches), scheme) (treeq eval and generate calibrate on wiki-train themselves)"
        )
    made_for, wanted = (s.model_dump(include=set(CALIBRATED_FIELDS)) for s in (calibration.scheme, scheme))
    if made_for != wanted:
        changed = sorted(k for k in wanted if wanted[k] != made_for[k])
        raise TreeqError(f"the calibration was made for other {', '.join(changed)}; calibrate again for this scheme")
    return calibration


def kv_cache_for(model, scheme: KVCacheScheme | str, calibration: KVCalibration | None = None) -> Cache:
    """A fresh cache for ``model`` storing keys and values as ``scheme`` (or a preset name) says;
    ``calibration``: what a calibrated kvquant scheme was calibrated to (kv_calibration.py)."""
    scheme = KVCacheScheme.named(scheme) if isinstance(scheme, str) else scheme
    calibration = _checked(scheme, calibration)

    def quantizers(layer: int, shape: AttentionShape) -> tuple[KVQuantizer, KVQuantizer]:
        tables = calibration.layers[layer] if calibration else None

        def one(what: str, bits: int, granularity: str, levels, channels) -> KVQuantizer:
            if bits == FULL_PRECISION:
                return IdentityKV()
            if scheme.method == "kvquant":
                return _kvquant(bits, granularity, scheme, shape, levels, channels)
            if scheme.method == "qrazor":
                return QRazorKV(bits, scheme.group_size, shape.head_dim)
            return _minmax(bits, granularity, scheme, shape, what)

        return (
            one("keys", scheme.key_bits, scheme.key_granularity, tables and tables.key_levels, tables and tables.keys),
            one("values", scheme.value_bits, scheme.value_granularity, tables and tables.value_levels, None),
        )

    return quantized_kv_cache(
        model, spec_for(model.config), quantizers, scheme.residual, scheme.sink_tokens, scheme.pre_rope_keys
    )


def cache_nbytes(cache: Cache) -> int:
    """Bytes the cache holds: stored codes, scales, minima and outliers, calibrated tables, and the
    full-precision sink and window."""
    return sum(layer.nbytes() for layer in cache.layers)


def fp16_cache_nbytes(model, tokens: int) -> int:
    """Bytes an fp16 cache of ``model`` holds for ``tokens`` tokens: 2 bytes x layers x kv heads x
    head_dim, for keys and for values; what a quantized cache's bytes are measured against."""
    config = model.config.get_text_config()
    shape = attention_shape(config, spec_for(model.config))
    return 2 * config.num_hidden_layers * shape.num_kv_heads * shape.head_dim * 2 * tokens
