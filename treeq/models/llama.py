"""Llama and the decoders that share its layer layout (SmolLM2 is a Llama)."""

from .spec import Subset, TreeSpec

SPEC = TreeSpec(
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    subsets=(
        Subset(
            name="qkv",
            modules=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            fed_by="input_layernorm",
        ),
        Subset(name="o", modules=("self_attn.o_proj",), fed_by="self_attn.v_proj"),
        Subset(name="gate_up", modules=("mlp.gate_proj", "mlp.up_proj"), fed_by="post_attention_layernorm"),
        Subset(name="down", modules=("mlp.down_proj",), fed_by="mlp.up_proj"),
    ),
)
