"""Sparse MoE decoders with Llama attention and routed experts only: Qwen3-MoE, OLMoE (and Mixtral,
under its own checkpoint names: treeq/models/mixtral.py).

Qwen3-MoE may make some layers dense (``mlp_only_layers``), so the dense MLP's subsets are listed
too, as optional."""

from .llama import SPEC as LLAMA
from .spec import ExpertGroup, Subset, TreeSpec


def gated_mlp(path: str, fed_by: str = "post_attention_layernorm") -> tuple[Subset, Subset]:
    """The two subsets of a gate/up/down MLP at ``path`` (dense or shared expert); optional, as
    only some layers of a MoE model have each kind."""
    return (
        Subset(name=f"{path}.gate_up", modules=(f"{path}.gate_proj", f"{path}.up_proj"), fed_by=fed_by, optional=True),
        Subset(name=f"{path}.down", modules=(f"{path}.down_proj",), fed_by=f"{path}.up_proj", optional=True),
    )


EXPERTS = ExpertGroup()
ATTENTION = LLAMA.subsets[:2]
DENSE_MLP = gated_mlp("mlp")

SPEC = TreeSpec(
    model_types=("qwen3_moe", "olmoe"),
    subsets=(*ATTENTION, *EXPERTS.subsets(fed_by="post_attention_layernorm"), *DENSE_MLP),
    experts=EXPERTS,
)
