"""AWQ's GEMM checkpoint layout (AutoAWQ ``version: gemm``), to and from treeq's GPTQ layout.

Both store unsigned 4-bit codes, an integer zero point and an fp16 scale per group and output
channel, dequantized as ``(code - zero) * scale``; they differ only in how tensors are laid out:

* ``qweight`` int32 [in, out / 8]: codes packed along the output dimension, eight per word, word
  ``c`` holding output channels ``8c + AWQ_ORDER[i]`` in nibble ``i`` (bits 4i .. 4i + 3);
* ``qzeros`` int32 [in / group, out / 8], packed the same way; ``scales`` fp16 [in / group, out];
* no ``g_idx``: groups are contiguous runs of input channels, so act-order without static groups
  cannot be written.

Converting is exact both ways, so an exported checkpoint computes the same as the GPTQ one, and
AWQ checkpoints written by other tools load as treeq models.
"""

from __future__ import annotations

import torch

from .. import packing
from ..errors import TreeqError
from ..numerics import UniformGrid, group_width
from .base import FormatSummary, SingleSchemeFormat

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
BITS = 4
PER_WORD = 8


def _interleave(codes: torch.Tensor) -> torch.Tensor:
    """Columns in the order their nibbles take within each word."""
    rows, cols = codes.shape
    order = torch.tensor(AWQ_ORDER, device=codes.device)
    return codes.reshape(rows, cols // PER_WORD, PER_WORD)[:, :, order].reshape(rows, cols)


def _deinterleave(codes: torch.Tensor) -> torch.Tensor:
    rows, cols = codes.shape
    inverse = torch.argsort(torch.tensor(AWQ_ORDER, device=codes.device))
    return codes.reshape(rows, cols // PER_WORD, PER_WORD)[:, :, inverse].reshape(rows, cols)


def pack_rows(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [rows, cols] -> int32 [rows, cols / 8] in AWQ's word layout."""
    return packing.pack(_interleave(codes).T.contiguous(), BITS).T.contiguous()


def unpack_rows(words: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_rows`."""
    return _deinterleave(packing.unpack(words.T.contiguous(), BITS).T)


def _linears(tensors: dict[str, torch.Tensor]) -> list[str]:
    return [k[: -len(".qweight")] for k in tensors if k.endswith(".qweight")]


def to_awq(tensors: dict[str, torch.Tensor], group_size: int) -> dict[str, torch.Tensor]:
    """A state dict in treeq's GPTQ layout -> the same weights in AWQ's GEMM layout."""
    out = dict(tensors)
    for name in _linears(tensors):
        codes = packing.unpack(out.pop(f"{name}.qweight"), BITS)  # [in, out]
        g_idx = out.pop(f"{name}.g_idx").long()
        if not torch.equal(g_idx, torch.arange(len(g_idx), device=g_idx.device) // group_width(group_size, len(g_idx))):
            raise TreeqError(f"{name}: act-order groups (g_idx) cannot be written in the AWQ layout")
        zeros = packing.unpack(out.pop(f"{name}.qzeros").T.contiguous(), BITS).T  # [groups, out]
        out[f"{name}.qweight"] = pack_rows(codes)
        out[f"{name}.qzeros"] = pack_rows(zeros)
    return out


def from_awq(tensors: dict[str, torch.Tensor], group_size: int) -> dict[str, torch.Tensor]:
    """A state dict in AWQ's GEMM layout -> treeq's GPTQ layout (g_idx made explicit)."""
    out = dict(tensors)
    for name in _linears(tensors):
        codes = unpack_rows(out.pop(f"{name}.qweight"))  # [in, out]
        zeros = unpack_rows(out.pop(f"{name}.qzeros"))  # [groups, out]
        n_in = codes.shape[0]
        out[f"{name}.qweight"] = packing.pack(codes, BITS)
        out[f"{name}.qzeros"] = packing.pack(zeros.T.contiguous(), BITS).T.contiguous()
        out[f"{name}.g_idx"] = (torch.arange(n_in, dtype=torch.int32) // group_width(group_size, n_in)).to(codes.device)
    return out


def awq_quantization_config(bits: int, group_size: int, meta: dict, unquantized: list[str]) -> dict:
    """The quantization_config AutoAWQ / transformers read for an AWQ GEMM checkpoint;
    ``unquantized``: the linears stored in full precision, which those loaders would otherwise
    replace by AWQ layers and then find no qweight for (full names: every loader's way of matching
    them, as prefixes, regular expressions or substrings, picks out these modules)."""
    return {
        "quant_method": "awq",
        "version": "gemm",
        "bits": bits,
        "group_size": group_size,
        "zero_point": True,
        "modules_to_not_convert": unquantized or None,  # as AutoAWQ writes it: null for none
        "meta": meta,
    }


def as_treeq_config(qcfg: dict) -> dict:
    """An AWQ quantization_config in the terms treeq's loader reads (bits, groups, sym, act-order)."""
    version = str(qcfg.get("version", "gemm")).lower()
    if version != "gemm" or qcfg.get("bits", BITS) != BITS:
        raise TreeqError(
            f"AWQ checkpoint with version {version!r} and {qcfg.get('bits')} bits: treeq reads version 'gemm', 4-bit"
        )
    if not qcfg.get("zero_point", True):
        raise TreeqError("AWQ checkpoints without zero points are not supported; treeq reads zero_point=true")
    # Zero points are whatever the file holds, so kernels must read them: not symmetric.
    return {
        **qcfg,
        "bits": BITS,
        "group_size": qcfg.get("group_size", qcfg.get("q_group_size", 128)),
        "sym": False,
        "desc_act": False,
        "checkpoint_format": "awq_gemm",
        "meta": qcfg.get("meta", {}),
    }


def linear_shape(qweight_shape: tuple[int, int]) -> tuple[int, int]:
    """(in_features, out_features) of a linear from its AWQ qweight's shape."""
    return qweight_shape[0], qweight_shape[1] * PER_WORD


class AWQFormat(SingleSchemeFormat):
    name = "awq"
    quant_methods = ("awq",)
    stored_state = ("qweight", "qzeros", "scales")

    def describe(self, qcfg: dict) -> str:
        return "AutoAWQ GEMM"

    def engines(self, qcfg: dict) -> tuple[str, str] | None:
        return "the `autoawq` or `gptqmodel` package", "vllm serve {dir} --dtype float16"

    def refuses(self, config) -> str | None:
        w = config.weights
        if w.bits != BITS or w.grid != UniformGrid.name:
            return f"checkpoint_format 'awq' holds 4-bit minmax grids only, not {w.bits}-bit {w.grid}"
        return super().refuses(config)

    def quantization_config(self, config, summary: FormatSummary, meta: dict, unquantized: list[str]) -> dict:
        return awq_quantization_config(config.weights.bits, config.weights.group_size, meta, unquantized)

    def to_stored(self, tensors: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
        return to_awq(tensors, config.weights.group_size)

    def reader_config(self, qcfg: dict) -> dict:
        return as_treeq_config(qcfg)

    def to_runtime(self, state: dict[str, torch.Tensor], qcfg: dict, bits_of) -> dict[str, torch.Tensor]:
        return from_awq(state, qcfg["group_size"])

    def linear_shape(self, packed_shape, qcfg: dict) -> tuple[int, int]:
        return linear_shape(packed_shape)


FORMAT = AWQFormat()
