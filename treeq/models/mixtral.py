"""Mixtral: the routed-experts layout of treeq/models/moe.py, but its original checkpoints (which
GPTQModel and vLLM read) name the MoE block ``block_sparse_moe`` and the experts' projections
``w1`` (gate), ``w3`` (up), ``w2`` (down); transformers 5 renames them to ``mlp`` and fuses them
(its conversion_mapping.py, "mixtral")."""

from .moe import SPEC as MOE

SPEC = MOE.model_copy(
    update={
        "model_types": ("mixtral",),
        "checkpoint_names": (
            ("mlp.experts.*.gate_proj", "block_sparse_moe.experts.*.w1"),
            ("mlp.experts.*.up_proj", "block_sparse_moe.experts.*.w3"),
            ("mlp.experts.*.down_proj", "block_sparse_moe.experts.*.w2"),
            ("mlp", "block_sparse_moe"),  # the router, mlp.gate
        ),
    }
)
