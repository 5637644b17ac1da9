"""Qwen2-MoE: a shared expert runs before the routed ones; its one-output sigmoid gate stays fp."""

from .moe import ATTENTION, DENSE_MLP, EXPERTS, gated_mlp
from .spec import TreeSpec

SPEC = TreeSpec(
    model_types=("qwen2_moe",),
    subsets=(
        *ATTENTION,
        *gated_mlp("mlp.shared_expert"),
        *EXPERTS.subsets(fed_by="post_attention_layernorm"),
        *DENSE_MLP,
    ),
    experts=EXPERTS,
    keep_fp=("mlp.shared_expert_gate",),
)
