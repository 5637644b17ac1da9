"""Validated quantization settings shared by the Python API and the CLI.

A :class:`QuantConfig` is a method (how to quantize) applied to schemes (what is quantized:
:mod:`treeq.schemes`), with calibration and checkpoint settings and the method's own ``options``
(checked by the method's ``Options`` model). Flat keyword arguments are shorthand for the nested
fields they name, so ``QuantConfig(method="gptq", bits=3, desc_act=False, seqlen=256)`` means
``weights.bits=3``, ``options.desc_act=False`` and ``calibration.seqlen=256``.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, field_validator, model_validator

from .data import BOS_RULES
from .engine.calib_precision import CALIB_DTYPES
from .errors import from_validation
from .formats import FORMATS
from .schemes import ActivationScheme, KVCacheScheme, ModuleOverride, WeightScheme, first_override, scheme_for

STORAGE_DTYPES = ("float16", "bfloat16", "float32")


class CalibrationSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    calib_samples: int = Field(128, gt=0, description="calibration sequences")
    seqlen: int = Field(512, gt=1, description="tokens per calibration sequence")
    batch_size: int = Field(8, gt=0, description="calibration sequences per layer forward")
    calib_dtype: Literal[CALIB_DTYPES] = Field(  # type: ignore[valid-type]
        "auto", description="dtype of calibration matmul inputs (engine/calib_precision.py); auto: bf16 where native"
    )
    true_sequential: bool = Field(True, description="quantize subsets in order, each seeing the ones before")
    bos: Literal[BOS_RULES] = Field(  # type: ignore[valid-type]
        BOS_RULES[0], description="a BOS first in each calibration window: auto (where the tokenizer adds one)"
    )
    routing: Literal["normal", "bypass", "all"] | PositiveInt = Field(
        "normal",
        description="MoE calibration routing: the model's own; bypass (every expert sees every token, outputs "
        "mixed by the real router); or top-k overridden to a number or all experts",
    )
    fallback_fraction: float = Field(
        0.005, ge=0, le=1, description="modules seeing fewer than this fraction of calibration tokens fall back"
    )
    fallback_method: str = Field("rtn", description="method for modules that saw too few calibration tokens")


class DistillSettings(BaseModel):
    """ZeroQuant's layer-wise knowledge distillation (treeq/engine/distill.py), run on each chosen
    decoder layer once its modules are quantized."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: PositiveInt = Field(50, description="AdamW steps per layer")
    sequences_per_step: PositiveInt = Field(2, description="calibration sequences each step trains on")
    lr: float = Field(
        0.002, gt=0, description="AdamW learning rate, relative: a step moves a weight by about lr of its grid step"
    )
    layers: Literal["all"] | tuple[NonNegativeInt, ...] = Field("all", description="decoder layers to distil")
    holdout: float = Field(
        0.25, gt=0, lt=1, description="share of calibration batches held out to judge a layer's result"
    )
    train_scales: bool = Field(False, description="learn each group's scale too (minmax grids)")
    teacher: Literal["fp-model", "fp-layer"] = Field(
        "fp-model",
        description="target of the layer's output: fp-model, the fp model's own output at this layer (the fp "
        "layer on the fp model's inputs, as ZeroQuant; it also undoes error the layers before left); fp-layer, "
        "the fp layer on the inputs the quantized model computes",
    )

    def applies_to(self, layer: int) -> bool:
        return self.layers == "all" or layer in self.layers

    def distills_after(self, layer: int) -> bool:
        """Whether a layer after ``layer`` is distilled (it needs the fp model's hidden states)."""
        return self.layers == "all" or any(chosen > layer for chosen in self.layers)


class CheckpointSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    gptq_version: Literal[1, 2] = Field(
        1,
        description="zero points of symmetric GPTQ checkpoints: 1 stores zero - 1 as most loaders expect, 2 as "
        "is; asymmetric ones are always written as 2 (v1 cannot store a zero point of 0)",
    )
    storage_dtype: Literal[STORAGE_DTYPES] = Field(  # type: ignore[valid-type]
        "float16", description="checkpoint dtype of the unquantized tensors (embeddings, norms, lm_head, biases)"
    )


# Where each flat shorthand key goes. Method options are whatever the method's Options model names.
NESTED_FIELDS = {
    "weights": WeightScheme,
    "calibration": CalibrationSettings,
    "checkpoint": CheckpointSettings,
}
FORMAT_SHORTHAND = {"checkpoint_format": "format"}  # the weight scheme's storage format, by its older name


def _as_dict(value, name: str) -> dict:
    """Section ``name`` of the settings (``weights``, ``options``, ...) as a dict."""
    if isinstance(value, BaseModel):
        return value.model_dump()
    if value is not None and not isinstance(value, dict):
        raise ValueError(f"{name} must be a mapping of its settings (e.g. weights: {{bits: 4}}), not {value!r}")
    return dict(value or {})


def _option_names(method) -> set[str]:
    return set(method.Options.model_fields) if method.Options is not None else set()


def _known_methods():
    from .methods import METHODS  # the registry imports every method, and methods import schemes

    return METHODS


def _known_migrations():
    from .transforms import TRANSFORMS  # migrations import the methods' statistics

    return TRANSFORMS


def _migration_option_names(name: str | None) -> set[str]:
    migration = _known_migrations().get(name) if name else None
    return set(migration.Options.model_fields) if migration is not None and migration.Options is not None else set()


class QuantConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str = "gptq"
    weights: WeightScheme = WeightScheme()
    activations: ActivationScheme | None = None
    kv_cache: KVCacheScheme | None = None
    overrides: tuple[ModuleOverride, ...] = Field((), description="per-module weight schemes; first match wins")
    calibration: CalibrationSettings = CalibrationSettings()
    checkpoint: CheckpointSettings = CheckpointSettings()
    options: dict[str, Any] = Field(default_factory=dict, description="method-specific settings, checked by the method")
    migration: str | None = Field(
        None, description="scale migration run on every layer before the method quantizes it (treeq/transforms/)"
    )
    migration_options: dict[str, Any] = Field(
        default_factory=dict, description="the scale migration's settings, checked by it"
    )
    distill: DistillSettings | None = Field(
        None, description="layer-wise knowledge distillation after each layer is quantized (ZeroQuant's LKD)"
    )

    @model_validator(mode="before")
    @classmethod
    def _nest_shorthand(cls, data: Any) -> Any:
        """Flat keys into the nested model or the method options that own them; the clip search the
        method prefers where the user left it unset."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        nested = {name: _as_dict(data.pop(name, None), name) for name in NESTED_FIELDS}
        options = _as_dict(data.pop("options", None), "options")
        migration_options = _as_dict(data.pop("migration_options", None), "migration_options")
        methods = _known_methods()
        method = methods.get(data.get("method", cls.model_fields["method"].default))
        for key in list(data):
            target = FORMAT_SHORTHAND.get(key, key)
            owner = next((n for n, model in NESTED_FIELDS.items() if target in model.model_fields), None)
            if owner is not None:
                nested[owner][target] = data.pop(key)
            elif method is not None and key in _option_names(method):
                options[key] = data.pop(key)
            elif key in _migration_option_names(data.get("migration")):
                migration_options[key] = data.pop(key)
            elif key not in cls.model_fields:
                owners = sorted(name for name, m in methods.items() if key in _option_names(m))
                if owners:
                    raise ValueError(
                        f"{key} is a setting of method {' and '.join(owners)}, not of {data.get('method')!r}"
                    )
                owners = sorted(name for name in _known_migrations() if key in _migration_option_names(name))
                if owners:
                    raise ValueError(
                        f"{key} is a setting of migration {' and '.join(owners)}, not of {data.get('migration')!r}"
                    )
        if method is not None and nested["weights"].get("clip_search") is None:
            nested["weights"]["clip_search"] = method.default_clip_search
        return {**data, **nested, "options": options, "migration_options": migration_options}

    @model_validator(mode="after")
    def _method_options(self) -> "QuantConfig":
        _known_methods()[self.method].parse_options(self.options)
        return self

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        if v not in _known_methods():
            raise ValueError(f"unknown method {v!r}; choose one of {', '.join(sorted(_known_methods()))}")
        return v

    @field_validator("migration")
    @classmethod
    def _known_migration(cls, v: str | None) -> str | None:
        if v is not None and v not in _known_migrations():
            raise ValueError(f"unknown migration {v!r}; choose one of {', '.join(sorted(_known_migrations()))}")
        return v

    @model_validator(mode="after")
    def _migration_settings(self) -> "QuantConfig":
        own = self.method_class().migration
        if own is not None and self.migration not in (None, own):
            raise ValueError(
                f"method {self.method!r} runs the {own!r} migration itself; for {self.migration!r} "
                f"choose another method (e.g. rtn or gptq)"
            )
        name = self.scale_migration()
        if name is None:
            if self.migration_options:
                raise ValueError(f"migration_options {sorted(self.migration_options)} given without a migration")
        else:
            _known_migrations()[name].parse_options(self.migration_options)
        return self

    @field_validator("calibration")
    @classmethod
    def _known_fallback(cls, v: CalibrationSettings) -> CalibrationSettings:
        if v.fallback_method not in _known_methods():
            raise ValueError(
                f"unknown fallback_method {v.fallback_method!r}; choose one of {', '.join(sorted(_known_methods()))}"
            )
        return v

    @model_validator(mode="after")
    def _grid_fits_methods(self) -> "QuantConfig":
        grid = self.weights.grid
        for role, name in (("method", self.method), ("fallback_method", self.calibration.fallback_method)):
            grids = _known_methods()[name].grids
            if grids is not None and grid not in grids:
                raise ValueError(
                    f"{role} {name!r} quantizes onto grid {' or '.join(map(repr, grids))} only, "
                    f"not {grid!r}; choose that grid or another method"
                )
        return self

    @model_validator(mode="after")
    def _distillation_fits(self) -> "QuantConfig":
        # Learned scales go through the minmax grid's levels (numerics.fake_quantize_learned).
        grids = sorted({s.grid for s in self.all_schemes()} - {"minmax"})
        if self.distill is not None and self.distill.train_scales and grids:
            raise ValueError(f"distill.train_scales learns minmax scales only, not grid {grids[0]!r}; allowed: False")
        if self.distill is not None and self.method_class().adds_input_transform:
            raise ValueError(f"distill trains plain weights; method {self.method!r} adds an input transform")
        if self.distill is not None:
            # As distill.py splits them: it needs a batch to train on beside those it holds out.
            c = self.calibration
            batches = -(-c.calib_samples // c.batch_size)
            held = max(1, math.ceil(batches * self.distill.holdout))
            if held >= batches:
                raise ValueError(
                    f"distill holds out {held} of the {batches} calibration batch(es) (calib_samples / batch_size) "
                    "and needs one more to train on; raise calibration.calib_samples or lower calibration.batch_size"
                )
        return self

    @model_validator(mode="after")
    def _bits_fit_method(self) -> "QuantConfig":
        allowed = self.method_class().bits
        for scheme in self.all_schemes():
            if allowed is not None and scheme.bits not in allowed:
                raise ValueError(
                    f"method {self.method!r} quantizes to bits {', '.join(map(str, allowed))} only, "
                    f"not {scheme.bits}; choose one of those or another method"
                )
        return self

    @model_validator(mode="after")
    def _format_fits(self) -> "QuantConfig":
        reason = FORMATS[self.weights.format].refuses(self)
        if reason:
            raise ValueError(reason)
        return self

    def method_class(self):
        return _known_methods()[self.method]

    def scale_migration(self) -> str | None:
        """The scale migration every layer runs before quantizing: the config's, or the one its method
        always runs (AWQ's); None: none."""
        return self.migration or self.method_class().migration

    def all_schemes(self) -> list[WeightScheme]:
        """Every weight scheme a module can get: the config's own and each override's."""
        return [self.weights] + [o.apply(self.weights) for o in self.overrides if not o.skip]

    def scheme_of(self, module: str) -> WeightScheme | None:
        """The weight scheme of ``module`` (full name): the first matching override's, else the
        config's; None when an override leaves it in full precision."""
        return scheme_for(module, self.weights, self.overrides)

    def override_of(self, module: str) -> ModuleOverride | None:
        """The override that decides ``module``'s scheme (full name); None if none matches."""
        return first_override(module, self.overrides)

    def quantized_scheme(self, module: str) -> WeightScheme:
        """The weight scheme a quantized module was quantized with (full module name)."""
        scheme = self.scheme_of(module)
        if scheme is None:
            raise ValueError(f"{module} was quantized although an override skips it")
        return scheme

    @classmethod
    def build(cls, **kwargs) -> "QuantConfig":
        """Construct from user input, turning validation failures into a one-line TreeqError."""
        try:
            return cls(**kwargs)
        except pydantic.ValidationError as e:
            raise from_validation(e, cls) from None
