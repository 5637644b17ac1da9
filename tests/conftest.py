"""Tiny random models for every spec'd architecture, a byte-level tokenizer, and text, all built here."""

from __future__ import annotations

import pytest
import torch
from threadpoolctl import threadpool_limits
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

# Sizes are multiples of 32 so every bit width (3-bit packs 32 codes per 3 words) can pack them.
COMMON = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)

ARCHS = ("llama", "qwen2", "qwen3", "mistral", "gemma3_text")

# Routed experts 32 wide (qwen3_moe, qwen2_moe, deepseek_v3) or intermediate_size wide (mixtral, olmoe).
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=32)
MOE_ARCHS = {
    "qwen3_moe": dict(MOE, num_experts=8),
    "mixtral": dict(MOE, num_local_experts=8),
    "olmoe": dict(MOE, num_experts=8, eos_token_id=0),
    "qwen2_moe": dict(MOE, num_experts=8, shared_expert_intermediate_size=64),
    # MLA attention (q and kv low rank), one dense layer first, two groups of experts.
    "deepseek_v3": dict(
        MOE,
        n_routed_experts=8,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        num_hidden_layers=3,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_rope_head_dim=32,
        head_dim=32,  # the rotary width: qk_rope_head_dim
        num_key_value_heads=4,  # MLA expands kv to every head
        qk_nope_head_dim=32,
        v_head_dim=32,
    ),
}

SENTENCES = [
    "The river ran quickly past the old mill, and the miller counted his sacks of grain.",
    "In 1887 the city council voted to build a new bridge across the harbour.",
    "Quantization maps real-valued weights onto a small set of integer levels.",
    "She wrote letters every morning before the markets opened in the square.",
    "A storm moved east across the mountains and the roads were closed for two days.",
    "Mathematicians proved the conjecture after nearly a century of partial results.",
]


@pytest.fixture(autouse=True)
def _deterministic_threads():
    """Shared machines are noisy; pin thread counts so results and timing do not wander."""
    torch.set_num_threads(2)
    with threadpool_limits(limits=2):
        yield


def make_tokenizer() -> PreTrainedTokenizerFast:
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def make_config(arch: str, **overrides):
    from transformers import AutoConfig

    kwargs = dict(COMMON, **MOE_ARCHS.get(arch, {}))
    kwargs.update(overrides)
    if arch == "gemma3_text":
        kwargs.update(sliding_window=16, layer_types=["sliding_attention", "full_attention"])
    return AutoConfig.for_model(arch, **kwargs)


def make_model(arch: str = "llama", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_config(arch, **overrides), dtype=torch.float32)
    return model.eval()


@pytest.fixture
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "calib.txt"
    rng = torch.Generator().manual_seed(0)
    order = torch.randint(0, len(SENTENCES), (400,), generator=rng).tolist()
    path.write_text(" ".join(SENTENCES[i] for i in order))
    return path


def save_model_dir(path, arch, tokenizer):
    """A saved tiny model, as a user's local model directory."""
    make_model(arch).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def model_dir(tmp_path, tokenizer):
    return save_model_dir(tmp_path / "tiny-llama", "llama", tokenizer)
