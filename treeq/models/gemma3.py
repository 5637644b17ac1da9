"""Gemma 3 (text): Llama-like projections, but the MLP is fed by its own pre-feedforward norm, and
norms scale by (1 + weight)."""

from .llama import SPEC as LLAMA
from .spec import Subset, TreeSpec

SPEC = TreeSpec(
    model_types=("gemma3_text",),
    norm_weight_offset=1.0,
    subsets=tuple(
        Subset(name=s.name, modules=s.modules, fed_by="pre_feedforward_layernorm") if s.name == "gate_up" else s
        for s in LLAMA.subsets
    ),
)
