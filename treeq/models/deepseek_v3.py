"""DeepSeek-V3: multi-head latent attention (low-rank q and kv with norms between the halves),
dense MLPs in the first ``first_k_dense_replace`` layers, then routed experts and a shared expert."""

from .moe import DENSE_MLP, EXPERTS, gated_mlp
from .spec import AttentionBlock, Subset, TreeSpec

SPEC = TreeSpec(
    model_types=("deepseek_v3",),
    subsets=(
        # q_a and kv_a read the same normed input; q_b runs between them, after q_a's norm.
        Subset(
            name="q_kv_a",
            modules=("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"),
            fed_by="input_layernorm",
        ),
        Subset(name="q_b", modules=("self_attn.q_b_proj",), fed_by="self_attn.q_a_layernorm"),
        Subset(name="kv_b", modules=("self_attn.kv_b_proj",), fed_by="self_attn.kv_a_layernorm"),
        Subset(name="o", modules=("self_attn.o_proj",), fed_by="self_attn.kv_b_proj"),
        *DENSE_MLP,
        *EXPERTS.subsets(fed_by="post_attention_layernorm"),
        *gated_mlp("mlp.shared_experts"),
    ),
    experts=EXPERTS,
    # Keys and values both come out of kv_b_proj's latent expansion, concatenated with RoPE'd parts.
    attention=AttentionBlock(k_proj=None, v_proj=None),
)
