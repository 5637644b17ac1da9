"""The KV-cache options of `treeq eval` and `treeq generate`: ``--kv PRESET``, then any field of
:class:`~treeq.schemes.KVCacheScheme` as ``--kv-FIELD`` (derived from the model, so defaults,
choices and help live there) changing the preset."""

from __future__ import annotations

import click
import pydantic

from treeq.errors import from_validation
from treeq.eval.perplexity import KV_PROTOCOLS
from treeq.schemes import KV_PRESETS, KVCacheScheme

from .config_options import derived_options, settings_from


def kv_options(with_protocol: bool):
    """Decorator adding the KV options; ``with_protocol`` adds how perplexity meets the cache."""

    def decorate(fn):
        fn = derived_options({"kv": [KVCacheScheme]}, prefix="kv-")(fn)
        if with_protocol:
            fn = click.option(
                "--kv-chunk", type=click.IntRange(1), default=32, show_default=True, help="tokens per step of decode"
            )(fn)
            fn = click.option(
                "--kv-protocol",
                type=click.Choice(KV_PROTOCOLS),
                default=KV_PROTOCOLS[0],
                show_default=True,
                help="simulated: each window one forward through the cache; decode: fed in chunks of --kv-chunk",
            )(fn)
        return click.option(
            "--kv",
            "kv_preset",
            type=click.Choice(list(KV_PRESETS)),
            default=None,
            help="quantize the KV cache with a named setting (--kv-FIELD options change it); none: no quantized cache",
        )(fn)

    return decorate


def kv_scheme(kv_preset: str | None, kwargs: dict) -> KVCacheScheme | None:
    """The KV setting the options describe, None when none was given; removes the derived options
    from ``kwargs``."""
    given = settings_from(kwargs).get("kv", {})
    if kv_preset is None and not given:
        return None
    try:
        return KVCacheScheme(**{**KV_PRESETS.get(kv_preset, {}), **given})
    except pydantic.ValidationError as e:
        raise from_validation(e) from None
