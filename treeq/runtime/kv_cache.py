"""A transformers cache whose older keys and values are held by a :class:`KVQuantizer`.

Each attention layer gets a :class:`QuantizedKVLayer`: the newest ``residual`` tokens stay in full
precision (as KIVI keeps them), older ones are handed to the layer's key and value quantizers in
blocks of ``token_block`` tokens (KIVI groups keys per channel over 32 tokens) and kept only in
the form the quantizer stores (codes, scales, outliers...). Attention reads the decoded blocks
followed by the full-precision window. Which quantizer, and where a layer's attention is, is the
KV scheme's and the tree spec's business; this module only stores.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable

import torch
from transformers.cache_utils import Cache, DynamicLayer

from ..errors import TreeqError
from ..models.spec import TreeSpec


class KVQuantizer(ABC):
    """How one layer's keys (or values) are stored once they leave the full-precision window."""

    # Tokens encoded together; the cache hands over whole multiples of it.
    token_block: int = 1

    @abstractmethod
    def encode(self, states: torch.Tensor) -> Any:
        """Store states [batch, kv_heads, tokens, head_dim] (tokens a multiple of token_block); what
        it returns says how many bytes it holds as ``nbytes`` (a tensor does)."""

    @abstractmethod
    def decode(self, stored: Any) -> torch.Tensor:
        """The states ``stored`` stands for, in the dtype they came in."""


class IdentityKV(KVQuantizer):
    """Stores states as they are: proves an attached cache changes nothing by itself."""

    def encode(self, states: torch.Tensor) -> torch.Tensor:
        return states

    def decode(self, stored: torch.Tensor) -> torch.Tensor:
        return stored


class QuantizedKVLayer(DynamicLayer):
    is_croppable = False

    def __init__(self, keys: KVQuantizer, values: KVQuantizer, residual: int):
        super().__init__()
        self.key_quantizer, self.value_quantizer, self.residual = keys, values, residual
        self.block = max(keys.token_block, values.token_block)
        if self.block % keys.token_block or self.block % values.token_block:
            raise TreeqError(
                f"key and value quantizers group {keys.token_block} and {values.token_block} tokens; "
                "one must divide the other"
            )
        self.stored: list[tuple[Any, Any]] = []
        self.stored_tokens = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self._encode_overflow()
        keys = [self.key_quantizer.decode(k) for k, _ in self.stored]
        values = [self.value_quantizer.decode(v) for _, v in self.stored]
        return torch.cat([*keys, self.keys], dim=-2), torch.cat([*values, self.values], dim=-2)

    def _encode_overflow(self) -> None:
        """Hand the whole blocks that fell out of the full-precision window to the quantizers."""
        n = (self.keys.shape[-2] - self.residual) // self.block * self.block
        if n <= 0:
            return
        keys, values = self.keys[..., :n, :], self.values[..., :n, :]
        self.stored.append((self.key_quantizer.encode(keys), self.value_quantizer.encode(values)))
        self.stored_tokens += n
        self.keys, self.values = self.keys[..., n:, :], self.values[..., n:, :]

    def nbytes(self) -> int:
        """Bytes held: every stored block (codes, scales, outliers...) and the full-precision window."""
        window = self.keys.nbytes + self.values.nbytes if self.is_initialized else 0
        return window + sum(keys.nbytes + values.nbytes for keys, values in self.stored)

    def get_seq_length(self) -> int:
        return self.stored_tokens + (self.keys.shape[-2] if self.is_initialized else 0)

    def reset(self) -> None:
        super().reset()
        self.stored, self.stored_tokens = [], 0


@dataclass(frozen=True)
class AttentionShape:
    """What a layer's KV quantizers are sized by, read through the spec's attention block."""

    num_heads: int
    num_kv_heads: int
    head_dim: int


def attention_shape(config, spec: TreeSpec) -> AttentionShape:
    block = spec.attention
    if block is None:
        raise TreeqError(f"the {spec.model_types[0]} spec names no attention block, so no KV cache can be attached")
    return AttentionShape(*(int(getattr(config, a)) for a in (block.num_heads, block.num_kv_heads, block.head_dim)))


def quantized_kv_cache(
    model,
    spec: TreeSpec,
    make_quantizers: Callable[[int, AttentionShape], tuple[KVQuantizer, KVQuantizer]],
    residual: int,
) -> Cache:
    """A cache for ``model``'s attention layers; ``make_quantizers(i, shape)``: layer i's (keys, values)."""
    config = model.config.get_text_config()
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or ()):
        raise TreeqError(
            f"{config.model_type} has sliding-window attention layers; the quantized KV cache keeps every "
            "token and does not hold them yet"
        )
    shape = attention_shape(config, spec)
    layers = [QuantizedKVLayer(*make_quantizers(i, shape), residual) for i in range(config.num_hidden_layers)]
    return Cache(layers=layers)
