"""Sparse MoE decoders with Llama attention and routed experts only: Qwen3-MoE, Mixtral, OLMoE.

Qwen3-MoE may make some layers dense (``mlp_only_layers``), so the dense MLP's subsets are listed
too, as optional."""

from .llama import SPEC as LLAMA
from .spec import ExpertGroup, TreeSpec

EXPERTS = ExpertGroup()
ATTENTION = LLAMA.subsets[:2]
DENSE_MLP = tuple(s.model_copy(update={"optional": True}) for s in LLAMA.subsets[2:])

SPEC = TreeSpec(
    model_types=("qwen3_moe", "mixtral", "olmoe"),
    subsets=(*ATTENTION, *EXPERTS.subsets(fed_by="post_attention_layernorm"), *DENSE_MLP),
    experts=EXPERTS,
)
