"""Validated quantization settings shared by the Python API and the CLI."""

from __future__ import annotations

from typing import Any, Literal

import pydantic
from pydantic import BaseModel, Field, PositiveInt, field_validator, model_validator

from .calib_precision import CALIB_DTYPES
from .errors import from_validation
from .numerics import GRIDS, INTEGER_ZERO_GRIDS, SUPPORTED_BITS, UniformGrid

CHECKPOINT_FORMATS = ("gptq", "awq", "compressed-tensors")
STORAGE_DTYPES = ("float16", "bfloat16", "float32")
COMPRESSED_TENSORS_BITS = (4, 8)


class QuantConfig(BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    method: str = "gptq"
    bits: Literal[SUPPORTED_BITS] = 4  # type: ignore[valid-type]
    group_size: int = Field(128, description="input channels per scale; -1 for one group per row")
    sym: bool = Field(True, description="for the minmax grid: zero point pinned to the middle code")
    grid: Literal[tuple(GRIDS)] = Field(  # type: ignore[valid-type]
        UniformGrid.name, description="quantization grid (treeq/numerics.py): " + ", ".join(GRIDS)
    )
    clip_search: bool = Field(
        None,  # type: ignore[assignment]  # filled in from the method's default before validation
        description="search each row's clip ratio minimising weight error (default: the method's choice)",
    )
    # On by default: on SmolLM2 4-bit it cut GPTQ's perplexity increase by ~40% (see bench/).
    desc_act: bool = Field(True, description="GPTQ act-order: quantize columns by decreasing Hessian diagonal")
    static_groups: bool = Field(False, description="with desc_act, fix group params before the GPTQ sweep")
    damp_percent: float = Field(0.01, gt=0, lt=1)
    block_size: int = Field(128, gt=0)
    true_sequential: bool = Field(True, description="quantize subsets in order, each seeing the ones before")
    calib_dtype: Literal[CALIB_DTYPES] = Field(  # type: ignore[valid-type]
        "auto", description="dtype of calibration matmul inputs (treeq/calib_precision.py); auto: bf16 where native"
    )
    calib_samples: int = Field(128, gt=0)
    seqlen: int = Field(512, gt=1)
    batch_size: int = Field(8, gt=0, description="calibration sequences per layer forward")
    checkpoint_format: Literal[CHECKPOINT_FORMATS] = Field(  # type: ignore[valid-type]
        "gptq",
        description="tensor layout written: GPTQ (any setting), AutoAWQ's GEMM (4-bit minmax, no act-order) or "
        "compressed-tensors pack-quantized (4/8-bit integer grids)",
    )
    gptq_version: Literal[1, 2] = Field(
        1,
        description="zero points of symmetric GPTQ checkpoints: 1 stores zero - 1 as most loaders expect, 2 as "
        "is; asymmetric ones are always written as 2 (v1 cannot store a zero point of 0)",
    )
    storage_dtype: Literal[STORAGE_DTYPES] = Field(  # type: ignore[valid-type]
        "float16", description="checkpoint dtype of the unquantized tensors (embeddings, norms, lm_head, biases)"
    )
    options: dict[str, Any] = Field(default_factory=dict, description="method-specific settings, checked by the method")
    routing: Literal["normal", "bypass", "all"] | PositiveInt = Field(
        "normal",
        description="MoE calibration routing: the model's own; bypass (every expert sees every token, outputs "
        "mixed by the real router); or top-k overridden to a number or all experts",
    )
    fallback_fraction: float = Field(
        0.005, ge=0, le=1, description="modules seeing fewer than this fraction of calibration tokens fall back"
    )
    fallback_method: str = Field("rtn", description="method for modules that saw too few calibration tokens")

    @model_validator(mode="before")
    @classmethod
    def _method_clip_default(cls, data: Any) -> Any:
        from .methods import METHODS

        if isinstance(data, dict) and data.get("clip_search") is None:
            method = METHODS.get(data.get("method", cls.model_fields["method"].default))
            data = {**data, "clip_search": method.default_clip_search if method else False}
        return data

    @field_validator("method", "fallback_method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        from .methods import METHODS

        if v not in METHODS:
            raise ValueError(f"unknown method {v!r}; choose one of {', '.join(sorted(METHODS))}")
        return v

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int) -> int:
        if v != -1 and v <= 0:
            raise ValueError("group_size must be -1 (per row) or a positive number of input channels")
        return v

    @model_validator(mode="after")
    def _grid_fits(self) -> "QuantConfig":
        from .methods import METHODS

        for role in ("method", "fallback_method"):
            grids = METHODS[getattr(self, role)].grids
            if grids is not None and self.grid not in grids:
                raise ValueError(
                    f"{role} {getattr(self, role)!r} quantizes onto grid {' or '.join(map(repr, grids))} only, "
                    f"not {self.grid!r}; choose that grid or another method"
                )
        allowed = GRIDS[self.grid].bits_allowed
        if self.bits not in allowed:
            raise ValueError(f"grid {self.grid!r} needs bits in {list(allowed)}, not {self.bits}")
        if not self.sym and self.grid != UniformGrid.name:
            raise ValueError(f"sym=False (asymmetric) only applies to grid {UniformGrid.name!r}, not {self.grid!r}")
        return self

    @model_validator(mode="after")
    def _format_fits(self) -> "QuantConfig":
        from .methods import METHODS

        name, method = self.checkpoint_format, METHODS[self.method]
        if name == "gptq":
            return self
        if name == "awq" and (self.bits != 4 or self.grid != UniformGrid.name):
            raise ValueError(f"checkpoint_format 'awq' holds 4-bit minmax grids only, not {self.bits}-bit {self.grid}")
        integer = self.bits in COMPRESSED_TENSORS_BITS and self.grid in INTEGER_ZERO_GRIDS
        if name == "compressed-tensors" and not integer:
            raise ValueError(
                f"checkpoint_format {name!r} holds 4- or 8-bit integer grids, not {self.bits}-bit {self.grid}"
            )
        if method.reorders_columns(self):
            raise ValueError(
                f"checkpoint_format {name!r} has no g_idx for act-order groups; "
                "set static_groups=True or desc_act=False"
            )
        if method.adds_input_transform:
            raise ValueError(f"checkpoint_format {name!r} cannot hold {self.method}'s input transform; use 'gptq'")
        return self

    @model_validator(mode="after")
    def _method_options(self) -> "QuantConfig":
        from .methods import METHODS

        METHODS[self.method].parse_options(self.options)
        return self

    @classmethod
    def build(cls, **kwargs) -> "QuantConfig":
        """Construct from user input, turning validation failures into a one-line TreeqError."""
        try:
            return cls(**kwargs)
        except pydantic.ValidationError as e:
            raise from_validation(e) from None
