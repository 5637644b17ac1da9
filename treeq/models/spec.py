"""The declarative description of an architecture that the looper walks."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Subset(BaseModel):
    """Linears quantized together. They read the same input, produced by ``fed_by``.

    ``fed_by`` names the op (a norm or the previous linear) whose output is this subset's input,
    so scaling methods can fold per-channel scales into it.
    """

    model_config = ConfigDict(frozen=True)

    name: str
    modules: tuple[str, ...] = Field(min_length=1)
    fed_by: str


class TreeSpec(BaseModel):
    """Where a model's decoder layers are, what surrounds them, and each layer's subsets in order."""

    model_config = ConfigDict(frozen=True)

    model_types: tuple[str, ...] = Field(min_length=1)
    layers: str = "model.layers"
    before: tuple[str, ...] = ("model.embed_tokens", "model.rotary_emb")
    after: tuple[str, ...] = ("model.norm", "lm_head")
    subsets: tuple[Subset, ...] = Field(min_length=1)
    # Norms compute x_normed * (offset + weight); Gemma's use offset 1. Scale folding needs to know.
    norm_weight_offset: float = 0.0

    @model_validator(mode="after")
    def _each_module_once(self) -> "TreeSpec":
        seen: set[str] = set()
        for s in self.subsets:
            for m in s.modules:
                if m in seen:
                    raise ValueError(f"module {m!r} appears in more than one subset")
                seen.add(m)
        return self

    @property
    def modules(self) -> list[str]:
        return [m for s in self.subsets for m in s.modules]
