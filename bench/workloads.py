"""Models the benches measure besides SmolLM2: a random Llama the size of a small production model."""

from __future__ import annotations

import torch


def random_llama(vocab_size: int, dtype: torch.dtype, max_positions: int):
    """Llama 2048 wide, 16 layers, GQA 16/4 heads, random weights (seed 0): a larger workload than
    the built-in model, with no weights to download."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "llama",
        vocab_size=vocab_size,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=4,
        max_position_embeddings=max_positions,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
