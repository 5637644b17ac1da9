"""The cache a :class:`~treeq.schemes.KVCacheScheme` describes: which quantizer keys and values get."""

from __future__ import annotations

from transformers.cache_utils import Cache

from ..errors import TreeqError
from ..models import spec_for
from ..schemes import KVCacheScheme
from .kivi import MinMaxKV
from .kv_cache import AttentionShape, IdentityKV, KVQuantizer, quantized_kv_cache

FULL_PRECISION = 16


def _quantizer(bits: int, granularity: str, scheme: KVCacheScheme, shape: AttentionShape, what: str) -> KVQuantizer:
    if bits == FULL_PRECISION:
        return IdentityKV()
    per_channel = granularity == "per-channel"
    if not per_channel and shape.head_dim % scheme.group_size:
        raise TreeqError(
            f"{what} per token in groups of {scheme.group_size} channels do not fit head_dim {shape.head_dim}; "
            f"set group_size (--kv-group-size) to a divisor of {shape.head_dim}"
        )
    return MinMaxKV(bits, per_channel, scheme.group_size)


def kv_cache_for(model, scheme: KVCacheScheme | str) -> Cache:
    """A fresh cache for ``model`` storing keys and values as ``scheme`` (or a preset name) says."""
    scheme = KVCacheScheme.named(scheme) if isinstance(scheme, str) else scheme

    def quantizers(_layer: int, shape: AttentionShape) -> tuple[KVQuantizer, KVQuantizer]:
        return (
            _quantizer(scheme.key_bits, scheme.key_granularity, scheme, shape, "keys"),
            _quantizer(scheme.value_bits, scheme.value_granularity, scheme, shape, "values"),
        )

    return quantized_kv_cache(model, spec_for(model.config), quantizers, scheme.residual)


def cache_nbytes(cache: Cache) -> int:
    """Bytes the cache holds: stored codes, scales and minima, and the full-precision window."""
    return sum(layer.nbytes() for layer in cache.layers)
