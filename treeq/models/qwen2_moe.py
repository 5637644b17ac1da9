"""Qwen2-MoE: a shared expert runs before the routed ones; its one-output sigmoid gate stays fp."""

from .moe import ATTENTION, DENSE_MLP, EXPERTS
from .spec import Subset, TreeSpec

SPEC = TreeSpec(
    model_types=("qwen2_moe",),
    subsets=(
        *ATTENTION,
        Subset(
            name="shared_expert.gate_up",
            modules=("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"),
            fed_by="post_attention_layernorm",
            optional=True,
        ),
        Subset(
            name="shared_expert.down",
            modules=("mlp.shared_expert.down_proj",),
            fed_by="mlp.shared_expert.up_proj",
            optional=True,
        ),
        *EXPERTS.subsets(fed_by="post_attention_layernorm"),
        *DENSE_MLP,
    ),
    experts=EXPERTS,
    keep_fp=("mlp.shared_expert_gate",),
)
