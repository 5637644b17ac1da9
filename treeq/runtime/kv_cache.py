"""A transformers cache whose older keys and values are held by a :class:`KVQuantizer`.

Each attention layer gets a :class:`QuantizedKVLayer`: the newest ``residual`` tokens stay in full
precision (as KIVI keeps them), older ones are handed to the layer's key and value quantizers in
blocks of ``token_block`` tokens (KIVI groups keys per channel over 32 tokens) and kept only in
the form the quantizer stores (codes, scales, outliers...). Attention reads the first ``sink``
tokens in full precision (KVQuant's attention sink), the decoded blocks, then the full-precision
window. With a :class:`~treeq.runtime.rope.KeyRotation`, keys are handed to the quantizer before
RoPE and rotated again on read. Which quantizer, and where a layer's attention is, is the KV
scheme's and the tree spec's business; this module only stores.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable

import torch
from transformers.cache_utils import Cache, DynamicLayer

from ..errors import TreeqError
from ..models.spec import TreeSpec
from .rope import KeyRotation

FULL_PRECISION = 16  # a KV setting's bits that keep states as the model computes them


class KVQuantizer(ABC):
    """How one layer's keys (or values) are stored once they leave the full-precision window."""

    # Tokens encoded together; the cache hands over whole multiples of it.
    token_block: int = 1
    # Bytes held once per layer rather than per block (calibrated ranges, level tables).
    nbytes: int = 0

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

    def __init__(
        self, keys: KVQuantizer, values: KVQuantizer, residual: int, sink: int = 0, rotation: KeyRotation | None = None
    ):
        super().__init__()
        self.key_quantizer, self.value_quantizer, self.residual = keys, values, residual
        self.sink, self.rotation = sink, rotation
        self.block = max(keys.token_block, values.token_block)
        if self.block % keys.token_block or self.block % values.token_block:
            raise TreeqError(
                f"key and value quantizers group {keys.token_block} and {values.token_block} tokens; "
                "one must divide the other"
            )
        self.stored: list[tuple[int, Any, Any]] = []  # (first token's position, keys, values)
        self.stored_tokens = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor, *args) -> None:
        super().lazy_initialization(key_states, value_states, *args)
        self.sink_keys, self.sink_values = key_states[..., :0, :], value_states[..., :0, :]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self._fill_sink()
        self._encode_overflow()
        keys = [self._read_keys(start, k) for start, k, _ in self.stored]
        values = [self.value_quantizer.decode(v) for _, _, v in self.stored]
        return (
            torch.cat([self.sink_keys, *keys, self.keys], dim=-2),
            torch.cat([self.sink_values, *values, self.values], dim=-2),
        )

    def _fill_sink(self) -> None:
        """Move the sequence's first tokens out of the window into the full-precision sink; it fills
        before any token is encoded, so it holds tokens 0..sink-1."""
        n = min(self.sink - self.sink_keys.shape[-2], self.keys.shape[-2])
        if n <= 0:
            return
        self.sink_keys = torch.cat([self.sink_keys, self.keys[..., :n, :]], dim=-2)
        self.sink_values = torch.cat([self.sink_values, self.values[..., :n, :]], dim=-2)
        self.keys, self.values = self.keys[..., n:, :], self.values[..., n:, :]

    def _encode_overflow(self) -> None:
        """Hand the whole blocks that fell out of the full-precision window to the quantizers."""
        n = (self.keys.shape[-2] - self.residual) // self.block * self.block
        if n <= 0:
            return
        start = self.sink_keys.shape[-2] + self.stored_tokens
        keys, values = self.keys[..., :n, :], self.values[..., :n, :]
        if self.rotation is not None:
            keys = self.rotation.unrotate(keys, start)
        self.stored.append((start, self.key_quantizer.encode(keys), self.value_quantizer.encode(values)))
        self.stored_tokens += n
        self.keys, self.values = self.keys[..., n:, :], self.values[..., n:, :]

    def _read_keys(self, start: int, stored: Any) -> torch.Tensor:
        keys = self.key_quantizer.decode(stored)
        return keys if self.rotation is None else self.rotation.rotate(keys, start, self.keys.dtype)

    def nbytes(self) -> int:
        """Bytes held: every stored block (codes, scales, outliers...), the full-precision sink and
        window, and the quantizers' per-layer tables."""
        held = self.key_quantizer.nbytes + self.value_quantizer.nbytes
        if not self.is_initialized:
            return held
        fp = (self.keys, self.values, self.sink_keys, self.sink_values)
        return held + sum(t.nbytes for t in fp) + sum(k.nbytes + v.nbytes for _, k, v in self.stored)

    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        return self.sink_keys.shape[-2] + self.stored_tokens + self.keys.shape[-2]

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
    sink: int = 0,
    pre_rope_keys: bool = False,
) -> Cache:
    """A cache for ``model``'s attention layers; ``make_quantizers(i, shape)``: layer i's (keys, values).
    ``pre_rope_keys``: keys are quantized before RoPE, rotated on read by the spec's rotary module."""
    config = model.config.get_text_config()
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or ()):
        raise TreeqError(
            f"{config.model_type} has sliding-window attention layers; the quantized KV cache keeps every "
            "token and does not hold them yet"
        )
    shape = attention_shape(config, spec)
    rotation = key_rotation(model, spec) if pre_rope_keys else None
    layers = [
        QuantizedKVLayer(*make_quantizers(i, shape), residual, sink, rotation) for i in range(config.num_hidden_layers)
    ]
    return Cache(layers=layers)


def key_rotation(model, spec: TreeSpec) -> KeyRotation:
    """The rotary module the spec's attention block names, to undo and redo RoPE on keys."""
    rotary = spec.attention.rotary if spec.attention is not None else None
    if rotary is None:
        raise TreeqError(
            f"the {spec.model_types[0]} spec names no rotary module, so keys cannot be kept before RoPE; "
            "set pre_rope_keys=False (--no-kv-pre-rope-keys)"
        )
    return KeyRotation(model.get_submodule(rotary))
