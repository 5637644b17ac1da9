"""What a checkpoint format (a stored tensor layout and its quantization_config) provides.

In memory every quantized linear is in treeq's GPTQ layout with zero points as they are (GPTQ v2):
``qweight``, ``qzeros``, ``scales``, ``g_idx``. A format converts that, exactly, to what it stores
and back, writes the ``quantization_config`` its loaders read, and says which settings it cannot
hold. The writer, the loader and the inspector ask the registry (:mod:`treeq.formats`) and never
name a format.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch


@dataclass(frozen=True)
class FormatSummary:
    """What the checkpoint-wide quantization_config says about the modules written: built from one
    results dict, or merged layer by layer when layers are streamed out and freed."""

    modules: tuple[str, ...]
    desc_act: bool
    sym: bool
    transform: dict | None
    extras: tuple[str, ...] = ()  # kinds of weight extras (treeq.extras) some module holds
    # Modules whose scheme asked for sym but whose method learned zero points off the middle code.
    learned_zeros: tuple[str, ...] = ()

    def merge(self, other: "FormatSummary") -> "FormatSummary":
        if self.transform is not None and other.transform is not None and self.transform != other.transform:
            raise ValueError(f"modules carry different input transforms ({self.transform}, {other.transform})")
        return FormatSummary(
            tuple(sorted(self.modules + other.modules)),
            self.desc_act or other.desc_act,
            self.sym and other.sym,
            self.transform if self.transform is not None else other.transform,
            tuple(sorted(set(self.extras) | set(other.extras))),
            tuple(sorted(self.learned_zeros + other.learned_zeros)),
        )


class CheckpointFormat(ABC):
    name: ClassVar[str]  # the WeightScheme.format value that writes it
    quant_methods: ClassVar[tuple[str, ...]]  # quantization_config quant_method values it reads
    packed_suffix: ClassVar[str] = ".qweight"  # the key suffix of a quantized linear's packed codes
    stored_state: ClassVar[tuple[str, ...]]  # a quantized linear's tensor names as stored

    def refuses(self, config) -> str | None:
        """Why this format cannot hold what ``config`` produces; None when it can."""
        return None

    @abstractmethod
    def quantization_config(self, config, summary: FormatSummary, meta: dict, unquantized: list[str]) -> dict:
        """What config.json's quantization_config says, in this format's loaders' terms;
        ``unquantized``: the linears left in full precision."""

    @abstractmethod
    def to_stored(self, tensors: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
        """treeq's GPTQ-layout state dict -> this format's."""

    @abstractmethod
    def reader_config(self, qcfg: dict) -> dict:
        """A stored quantization_config in the terms treeq's loader reads: bits, group_size, sym,
        desc_act, grid (default minmax), and whatever :meth:`to_runtime` needs."""

    @abstractmethod
    def to_runtime(self, state: dict[str, torch.Tensor], qcfg: dict, bits_of) -> dict[str, torch.Tensor]:
        """This format's state dict -> treeq's GPTQ layout; ``qcfg`` from :meth:`reader_config`,
        ``bits_of(module)`` each quantized module's bits."""

    @abstractmethod
    def linear_shape(self, packed_shape, qcfg: dict) -> tuple[int, int]:
        """(in_features, out_features) of a quantized linear from its packed codes' shape (the key
        :meth:`codes_owner` names); ``qcfg``: the module's own quantization_config."""

    def codes_owner(self, qcfg: dict, key: str, keys: set[str]) -> str | None:
        """The quantized linear whose packed codes the stored tensor ``key`` holds (``keys``: every
        key of its file), or None when ``key`` holds none."""
        return key.removesuffix(self.packed_suffix) if key.endswith(self.packed_suffix) else None

    @abstractmethod
    def describe(self, qcfg: dict) -> str:
        """The layout a stored quantization_config is in, for the model card."""

    @abstractmethod
    def engines(self, qcfg: dict) -> tuple[str, str] | None:
        """(what transformers needs installed, the vLLM command with ``{dir}``) to run a checkpoint
        of this quantization_config elsewhere; None where only treeq computes it correctly."""


class SingleSchemeFormat(CheckpointFormat):
    """A layout with one weight scheme for every module and no act-order groups."""

    def refuses(self, config) -> str | None:
        method = config.method_class()
        if any(not o.skip for o in config.overrides):
            return f"per-module schemes need checkpoint_format 'gptq'; {self.name!r} holds one scheme"
        if method.reorders_columns(method.parse_options(config.options)):
            return (
                f"checkpoint_format {self.name!r} has no g_idx for act-order groups; "
                "set static_groups=True or desc_act=False"
            )
        if method.adds_input_transform:
            return f"checkpoint_format {self.name!r} cannot hold {config.method}'s input transform; use 'gptq'"
        if method.adds_weight_extras:
            return f"checkpoint_format {self.name!r} cannot hold {config.method}'s weight extras; use 'gptq'"
        return None
