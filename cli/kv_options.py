"""The KV-cache options of `treeq quantize`, `treeq eval` and `treeq generate`: ``--kv PRESET``, then any field of
:class:`~treeq.schemes.KVCacheScheme` as ``--kv-FIELD`` (derived from the model, so defaults,
choices and help live there) changing the preset."""

from __future__ import annotations

import click
import pydantic

from treeq.errors import TreeqError, from_validation
from treeq.eval.perplexity import KV_PROTOCOLS
from treeq.runtime.kv_choice import NO_KV
from treeq.schemes import KV_PRESETS, KVCacheScheme

from .config_options import derived_options, settings_from

OWNER = "kv"  # the derived options' key prefix (kv__group_size)


def kv_chunk_option(fn):
    return click.option(
        "--kv-chunk", type=click.IntRange(1), default=32, show_default=True, help="tokens per step of decode"
    )(fn)


def kv_options(with_protocol: bool):
    """Decorator adding the KV options; ``with_protocol`` adds how perplexity meets the cache."""

    def decorate(fn):
        fn = derived_options({OWNER: [KVCacheScheme]}, prefix="kv-")(fn)
        if with_protocol:
            fn = kv_chunk_option(fn)
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
            type=click.Choice([*KV_PRESETS, NO_KV]),
            default=None,
            help="quantize the KV cache with a named setting (--kv-FIELD options change it); default: the "
            f"scheme a checkpoint stores, if any; {NO_KV}: no quantized cache",
        )(fn)

    return decorate


def kv_scheme(kv_preset: str | None, kwargs: dict) -> KVCacheScheme | str | None:
    """The KV setting the options describe: None when none was given (a checkpoint's stored one
    then applies), "none" for --kv none; removes the derived options from ``kwargs``."""
    # Only the KV options: `treeq quantize` has the weights' and others' derived options beside them.
    given = settings_from({k: kwargs.pop(k) for k in list(kwargs) if k.startswith(f"{OWNER}__")}).get(OWNER, {})
    if kv_preset is None and not given:
        return None
    if kv_preset == NO_KV:
        if given:
            raise TreeqError(f"--kv {NO_KV} keeps no quantized cache; drop --kv-{next(iter(given)).replace('_', '-')}")
        return NO_KV
    try:
        return KVCacheScheme(**{**KV_PRESETS.get(kv_preset, {}), **given})
    except pydantic.ValidationError as e:
        raise from_validation(e, KVCacheScheme) from None
