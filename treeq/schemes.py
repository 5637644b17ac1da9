"""Schemes: *what* is quantized, apart from *how* (the method).

A :class:`WeightScheme` says how a linear's weight is stored (bits, groups, grid, storage format);
an :class:`ActivationScheme` how a linear's input is quantized; a :class:`KVCacheScheme` how the
attention's keys and values are kept. :class:`ModuleOverride` entries change the weight scheme of
the modules whose name they match (mixed precision), or leave them in full precision.

Override patterns follow GPTQModel's and vLLM's ``dynamic`` rule, so a recipe means the same there:
``re.match`` against the module's full name (anchored at the start only), first match wins.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, field_validator, model_validator

from .errors import TreeqError
from .formats import FORMAT_NAMES
from .numerics import GRIDS, SUPPORTED_BITS, UniformGrid

ACTIVATION_BITS = (4, 6, 8)
ACTIVATION_GRANULARITIES = ("per-token", "per-tensor", "per-group")
ACTIVATION_GRIDS = ("uniform", "qrazor")
KV_GRANULARITIES = ("per-channel", "per-token")
KV_METHODS = ("minmax", "kvquant", "qrazor")
KV_LEVELS = ("uniform", "nonuniform")
KV_BITS = (*SUPPORTED_BITS, 16)
QRAZOR_KV_BITS = (2, 3, 4, 16)
# KV-cache fields only some methods honour: each is refused elsewhere unless left at its default.
KV_METHOD_FIELDS = {f: ("kvquant",) for f in ("pre_rope_keys", "levels", "outliers", "sink_tokens")}


class _Scheme(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WeightScheme(_Scheme):
    bits: Literal[SUPPORTED_BITS] = 4  # type: ignore[valid-type]
    group_size: int = Field(
        128,
        description="input channels per scale; -1 for one group per row (64 for the built-in SmolLM2, whose "
        "width 576 is no multiple of 128)",
    )
    sym: bool = Field(
        True, description="minmax grid: zero point pinned to the middle code", json_schema_extra={"cli": "--sym/--asym"}
    )
    grid: Literal[tuple(GRIDS)] = Field(  # type: ignore[valid-type]
        UniformGrid.name, description="quantization grid (treeq/numerics.py): " + ", ".join(GRIDS)
    )
    clip_search: bool | None = Field(
        None, description="search each row's clip ratio minimising weight error (default: the method's choice)"
    )
    format: Literal[FORMAT_NAMES] = Field(  # type: ignore[valid-type]
        "gptq",
        description="checkpoint layout (treeq/formats/): gptq (any setting), awq (AutoAWQ GEMM: 4-bit minmax, "
        "no act-order), compressed-tensors (pack-quantized: 4/8-bit integer grids), qrazor (the qrazor grid: codes, "
        "3-bit shifts per group, an fp16 scale per row) or spqr (method spqr: codes, scale codes with second-level "
        "statistics, outliers)",
    )

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int) -> int:
        if v != -1 and v <= 0:
            raise ValueError("group_size must be -1 (per row) or a positive number of input channels")
        return v

    @model_validator(mode="after")
    def _grid_fits(self) -> "WeightScheme":
        allowed = GRIDS[self.grid].bits_allowed
        if self.bits not in allowed:
            raise ValueError(f"grid {self.grid!r} needs bits in {list(allowed)}, not {self.bits}")
        if not self.sym and self.grid != UniformGrid.name:
            raise ValueError(f"sym=False (asymmetric) only applies to grid {UniformGrid.name!r}, not {self.grid!r}")
        return self


class ActivationScheme(_Scheme):
    bits: Literal[ACTIVATION_BITS] = Field(8, description="bits of each linear's input")  # type: ignore[valid-type]
    granularity: Literal[ACTIVATION_GRANULARITIES] = Field(  # type: ignore[valid-type]
        "per-token", description="one input scale per token, per tensor, or per group of input channels"
    )
    group_size: PositiveInt | None = Field(None, description="input channels per scale, for per-group only")
    sym: bool = Field(True, description="symmetric input levels (zero point 0)")
    dynamic: bool = Field(True, description="ranges from each input at run time; False: calibrated once")
    outlier_threshold: float | None = Field(
        None, gt=0, description="input columns whose magnitude exceeds this in any token stay in full precision"
    )
    grid: Literal[ACTIVATION_GRIDS] = Field(  # type: ignore[valid-type]
        "uniform",
        description="uniform levels, or qrazor: each token to 16 bits, then per group of group_size channels "
        "a sign and bits-1 bits from the group's leading one (treeq/numerics.py)",
    )

    @model_validator(mode="after")
    def _razor_fits(self) -> "ActivationScheme":
        if self.grid == "qrazor" and (self.granularity, self.sym, self.dynamic) != ("per-group", True, True):
            raise ValueError(
                "grid 'qrazor' razors groups of each token at run time: needs granularity 'per-group', "
                "sym=True, dynamic=True"
            )
        return self

    @model_validator(mode="after")
    def _consistent(self) -> "ActivationScheme":
        if (self.granularity == "per-group") != (self.group_size is not None):
            raise ValueError("group_size is required with granularity 'per-group' and only allowed there")
        if not self.dynamic and self.granularity == "per-token":
            raise ValueError("a calibrated (dynamic=False) range cannot be per-token; use per-tensor or per-group")
        return self

    def describe(self) -> str:
        """e.g. "8-bit per-token sym dynamic, fp columns above 6.0" (inspect, model card, repr)."""
        outliers = "" if self.outlier_threshold is None else f", fp columns above {self.outlier_threshold}"
        group = f" of {self.group_size}" if self.group_size else ""
        ranges = "dynamic" if self.dynamic else "static"
        return f"{self.bits}-bit {self.granularity}{group} {'sym' if self.sym else 'asym'} {ranges}{outliers}"


class KVCacheScheme(_Scheme):
    """How attention's keys and values are kept in the cache (treeq/runtime/kv_schemes.py builds it)."""

    method: Literal[KV_METHODS] = Field(  # type: ignore[valid-type]
        "minmax",
        description="minmax: KIVI's asymmetric min/max levels per group; kvquant: KVQuant's calibrated per-channel "
        "key ranges, per-token values, and the parts below it alone honours (treeq/runtime/kvquant.py); qrazor: "
        "each token 8-bit absmax, razored per group of group_size channels (treeq/runtime/qrazor_kv.py)",
    )
    key_bits: Literal[KV_BITS] = Field(4, description="16: kept as the model computes them")  # type: ignore[valid-type]
    value_bits: Literal[KV_BITS] = Field(4, description="16: kept as the model computes them")  # type: ignore[valid-type]
    key_granularity: Literal[KV_GRANULARITIES] = Field(  # type: ignore[valid-type]
        "per-channel", description="kvquant: per-channel ranges are calibrated offline, per-token ones taken per token"
    )
    value_granularity: Literal[KV_GRANULARITIES] = "per-token"  # type: ignore[valid-type]
    group_size: PositiveInt = Field(
        32,
        description="tokens (minmax per-channel) or channels (per-token) per scale; kvquant's per-channel "
        "keys have one calibrated range per channel",
    )
    residual: NonNegativeInt = Field(128, description="newest tokens kept in full precision")
    sym: bool = Field(False, description="symmetric levels (no method has them yet)")
    pre_rope_keys: bool = Field(False, description="quantize keys before RoPE; the cache applies it on read (kvquant)")
    levels: Literal[KV_LEVELS] = Field(  # type: ignore[valid-type]
        "uniform",
        description="nonuniform: per-layer levels from Fisher-weighted k-means on calibration activations (kvquant)",
    )
    outliers: float = Field(
        0.0,
        ge=0.0,
        lt=0.5,
        description="share of keys and values kept in fp16 beside the codes, dense-and-sparse (kvquant; paper: 0.01)",
    )
    sink_tokens: NonNegativeInt = Field(0, description="first tokens kept in full precision, attention sink (kvquant)")

    @model_validator(mode="after")
    def _implemented(self) -> "KVCacheScheme":
        # Refusing a setting beats silently ignoring it: each field below is honoured only by the
        # methods named beside it.
        if self.sym:
            raise ValueError(f"sym=True: method {self.method!r} is asymmetric; allowed: sym=False")
        defaults = KVCacheScheme.model_fields
        for field, methods in KV_METHOD_FIELDS.items():
            value = getattr(self, field)
            if self.method not in methods and value != defaults[field].default:
                raise ValueError(
                    f"{field}={value!r}: method {self.method!r} does not have it; methods that do: {', '.join(methods)}"
                )
        if self.method == "kvquant" and self.value_granularity != "per-token":
            raise ValueError("value_granularity='per-channel': kvquant keeps values per token; allowed: per-token")
        if self.method == "qrazor" and "per-channel" in (self.key_granularity, self.value_granularity):
            raise ValueError("qrazor razors each token's channels: set key_granularity and value_granularity per-token")
        if self.method == "qrazor" and not {self.key_bits, self.value_bits} <= set(QRAZOR_KV_BITS):
            raise ValueError(f"qrazor keeps a sign and bits-1 bits of 8: key_bits and value_bits in {QRAZOR_KV_BITS}")
        return self

    def describe(self) -> str:
        def part(what: str, bits: int, granularity: str) -> str:
            return f"{what} fp" if bits == 16 else f"{what} {bits}-bit {granularity}"

        extras = {
            "keys before RoPE": self.pre_rope_keys,
            f"{self.levels} levels": self.method == "kvquant",
            f"{self.outliers:.1%} outliers fp16": self.outliers > 0,
            f"first {self.sink_tokens} tokens fp": self.sink_tokens > 0,
        }
        return (
            f"{self.method}: {part('keys', self.key_bits, self.key_granularity)}, "
            f"{part('values', self.value_bits, self.value_granularity)}, groups of {self.group_size}, "
            + "".join(f"{text}, " for text, on in extras.items() if on)
            + f"newest {self.residual} tokens fp"
        )

    @classmethod
    def named(cls, name: str) -> "KVCacheScheme":
        """A preset by name (``--kv kivi-2``), one-line error listing the names otherwise."""
        if name not in KV_PRESETS:
            raise TreeqError(f"unknown KV setting {name!r}; choose one of {', '.join(KV_PRESETS)}")
        return cls(**KV_PRESETS[name])


# Named KV settings: KIVI's (keys per channel, values per token, groups of 32, 128 fp tokens), the
# per-token-keys baseline KIVI is measured against, the unquantized cache, and KVQuant's with every
# part on (no fp window, as its paper; values per token over 64 channels, SmolLM2's whole head).
KVQUANT_PARTS = dict(group_size=64, residual=0, pre_rope_keys=True, levels="nonuniform", outliers=0.01, sink_tokens=1)
KV_PRESETS: dict[str, dict] = {
    "fp": dict(key_bits=16, value_bits=16),
    "kivi-4": dict(key_bits=4, value_bits=4),
    "kivi-2": dict(key_bits=2, value_bits=2),
    "per-token-4": dict(key_bits=4, value_bits=4, key_granularity="per-token"),
    "per-token-2": dict(key_bits=2, value_bits=2, key_granularity="per-token"),
    **{f"kvquant-{bits}": dict(method="kvquant", key_bits=bits, value_bits=bits, **KVQUANT_PARTS) for bits in (4, 3)},
    # QRazor's KV4: each token's head vector razored in groups of 16 channels
    "qrazor-4": dict(method="qrazor", key_bits=4, value_bits=4, key_granularity="per-token", group_size=16),
}


class ModuleOverride(_Scheme):
    """The weight scheme of the modules whose full name ``pattern`` matches (re.match), or ``skip``."""

    pattern: str
    skip: bool = False
    bits: Literal[SUPPORTED_BITS] | None = None  # type: ignore[valid-type]
    group_size: int | None = None
    sym: bool | None = None
    grid: Literal[tuple(GRIDS)] | None = None  # type: ignore[valid-type]

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as e:
            raise ValueError(f"not a regular expression ({e})") from None
        return v

    @model_validator(mode="after")
    def _says_something(self) -> "ModuleOverride":
        changes = self.changes()
        if self.skip and changes:
            raise ValueError(f"a skipped module keeps full precision; drop {sorted(changes)} or skip")
        if not self.skip and not changes:
            raise ValueError("an override sets skip=True or at least one of bits, group_size, sym, grid")
        return self

    def changes(self) -> dict:
        return {
            k: v for k, v in self.model_dump(include={"bits", "group_size", "sym", "grid"}).items() if v is not None
        }

    def matches(self, module: str) -> bool:
        return re.match(self.pattern, module) is not None

    def apply(self, base: WeightScheme) -> WeightScheme | None:
        """The scheme for a matched module: None when it is skipped. Validated as a whole, so an
        override that makes an impossible scheme (3-bit fp8-int4) names the field."""
        return None if self.skip else WeightScheme(**{**base.model_dump(), **self.changes()})


def first_override(module: str, overrides: tuple[ModuleOverride, ...]) -> ModuleOverride | None:
    """The override that decides ``module``'s scheme: the first that matches; None if none does."""
    return next((o for o in overrides if o.matches(module)), None)


def scheme_for(module: str, base: WeightScheme, overrides: tuple[ModuleOverride, ...]) -> WeightScheme | None:
    """The weight scheme of ``module``: the first matching override's, else ``base``; None: skip."""
    override = first_override(module, overrides)
    return base if override is None else override.apply(base)
