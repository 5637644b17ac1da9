"""SpQR's compact checkpoint: the group scales stored as their second-level codes, act-order groups
in as few bits as they need, the outliers as CSR with per-row counts.

In memory an SpQR linear is treeq's GPTQ layout plus its extras (:mod:`treeq.extras.spqr`). Stored,
each quantized linear holds:

* ``qweight``, ``qzeros``: codes and integer zero points packed as GPTQ packs them (zero points
  as they are, GPTQ v2's convention);
* ``scale_codes``: each group scale's ``stats_bits``-bit code, the [groups, out] grid flattened and
  packed into int32 words; ``scale_step``, ``scale_min``: fp16 [groups, out / stats_group]. The fp16
  ``scales`` are rebuilt as :func:`treeq.extras.spqr.scales_from_statistics` computes them, which
  is how the method computed them: exact. Writing checks it and refuses scales that differ;
* ``group_index``: with act-order, each input channel's group (what the act-order permutation
  decides; the order within a group changes nothing) packed at ceil(log2(groups)) bits;
  absent without act-order;
* the outliers: ``residual_counts`` per output row (uint8, or the smallest unsigned/int type that
  holds the largest count) instead of CSR row pointers, ``residual_cols`` (int16), ``residual_values``
  (fp16); the row pointers are their running sum.

No other engine reads ``quant_method: treeq-spqr`` (transformers' own ``spqr`` is a different layout),
so they refuse the checkpoint rather than run its dense part alone.
"""

from __future__ import annotations

import math

import torch

from .. import packing
from ..errors import TreeqError
from ..extras.spqr import scales_from_statistics
from ..numerics import UniformGrid, group_width
from .base import CheckpointFormat, FormatSummary
from .gptq import dynamic

QUANT_METHOD = "treeq-spqr"
METHOD = "spqr"  # the method whose results (and options: stats_bits, ...) this format stores


def _linears(tensors: dict[str, torch.Tensor]) -> list[str]:
    return [k[: -len(".qweight")] for k in tensors if k.endswith(".qweight")]


def index_bits(groups: int) -> int:
    return max(1, math.ceil(math.log2(groups)))


def count_dtype(largest: int) -> torch.dtype:
    return next(d for d in (torch.uint8, torch.int16, torch.int32) if largest <= torch.iinfo(d).max)


def to_spqr(tensors: dict[str, torch.Tensor], stats_bits: int, group_size: int) -> dict[str, torch.Tensor]:
    """treeq's GPTQ layout with SpQR's extras -> the compact layout; modules without the statistics
    (a fallback method's) keep their fp16 scales."""
    out = dict(tensors)
    for name in _linears(tensors):
        if f"{name}.scale_codes" not in out:
            continue
        codes = out[f"{name}.scale_codes"]
        rebuilt = scales_from_statistics(codes, out[f"{name}.scale_step"], out[f"{name}.scale_min"])
        if not torch.equal(rebuilt, out.pop(f"{name}.scales")):
            raise TreeqError(f"{name}: its scales are not what its second-level statistics give; cannot store them")
        out[f"{name}.scale_codes"] = packing.pack_flat(codes, stats_bits)
        g_idx = out.pop(f"{name}.g_idx").long()
        width = group_width(group_size, len(g_idx))
        if not torch.equal(g_idx, torch.arange(len(g_idx), device=g_idx.device) // width):
            out[f"{name}.group_index"] = packing.pack_flat(g_idx, index_bits(len(g_idx) // width))
        counts = out.pop(f"{name}.residual_rows").diff()
        out[f"{name}.residual_counts"] = counts.to(count_dtype(int(counts.max())))
    return out


def from_spqr(tensors: dict[str, torch.Tensor], stats_bits: int, group_size: int, bits_of) -> dict[str, torch.Tensor]:
    """Inverse of :func:`to_spqr`; ``bits_of(module)``: its codes' bits."""
    out = dict(tensors)
    for name in _linears(tensors):
        if f"{name}.scale_codes" not in out:
            continue
        step, low = out[f"{name}.scale_step"], out[f"{name}.scale_min"]
        shape = (step.shape[0], out[f"{name}.qweight"].shape[1])
        codes = packing.unpack_flat(out[f"{name}.scale_codes"], stats_bits, shape).to(torch.uint8)
        out[f"{name}.scale_codes"] = codes
        out[f"{name}.scales"] = scales_from_statistics(codes, step, low)
        n_in = out[f"{name}.qweight"].shape[0] * packing.WORD_BITS // bits_of(name)
        groups = n_in // group_width(group_size, n_in)
        packed = out.pop(f"{name}.group_index", None)
        if packed is not None:
            out[f"{name}.g_idx"] = packing.unpack_flat(packed, index_bits(groups), (n_in,)).to(torch.int32)
        counts = out.pop(f"{name}.residual_counts").to(torch.int32)
        out[f"{name}.residual_rows"] = torch.cat([counts.new_zeros(1), counts.cumsum(0, dtype=torch.int32)])
    return out


class SpQRFormat(CheckpointFormat):
    name = "spqr"
    quant_methods = (QUANT_METHOD,)
    stored_state = ("qweight", "qzeros", "scale_codes", "scale_step", "scale_min", "group_index", "residual_counts")

    def refuses(self, config) -> str | None:
        if config.method != METHOD:
            return f"checkpoint_format 'spqr' holds SpQR's results only, not {config.method}'s; use 'gptq'"
        if any(not o.skip for o in config.overrides):
            return "per-module schemes need checkpoint_format 'gptq'; 'spqr' holds one scheme"
        return None

    def quantization_config(self, config, summary: FormatSummary, meta: dict, unquantized: list[str]) -> dict:
        w, options = config.weights, config.method_class().parse_options(config.options)
        qcfg = {
            "quant_method": QUANT_METHOD,
            "format": self.name,
            "checkpoint_format": self.name,
            "bits": w.bits,
            "group_size": w.group_size,
            "desc_act": summary.desc_act,
            "sym": summary.sym,
            **options.model_dump(),
            **UniformGrid(w.bits, w.sym).describe(),
            "weight_extras": list(summary.extras),
            "meta": meta,
        }
        if config.overrides:  # only skips pass refuses(); loaders read them as GPTQModel's dynamic
            qcfg["dynamic"] = dynamic(config, summary)
        return qcfg

    def to_stored(self, tensors: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
        options = config.method_class().parse_options(config.options)
        return to_spqr(tensors, options.stats_bits, config.weights.group_size)

    def reader_config(self, qcfg: dict) -> dict:
        if "stats_bits" not in qcfg:
            raise TreeqError("an spqr quantization_config lacks stats_bits; the checkpoint is incomplete")
        return {**qcfg, "meta": qcfg.get("meta", {})}

    def to_runtime(self, state: dict[str, torch.Tensor], qcfg: dict, bits_of) -> dict[str, torch.Tensor]:
        return from_spqr(state, qcfg["stats_bits"], qcfg["group_size"], bits_of)

    def linear_shape(self, packed_shape, qcfg: dict) -> tuple[int, int]:
        return packed_shape[0] * packing.WORD_BITS // qcfg["bits"], packed_shape[1]

    def describe(self, qcfg: dict) -> str:
        return (
            f"SpQR (`quant_method: {QUANT_METHOD}`): {qcfg['bits']}-bit codes and zero points per group of "
            f"{qcfg['group_size']}, scales as {qcfg['stats_bits']}-bit codes with an fp16 step and minimum per "
            f"{qcfg['stats_group']} rows, each input channel's act-order group, fp16 outliers in CSR"
        )

    def engines(self, qcfg: dict) -> tuple[str, str] | None:
        return None


FORMAT = SpQRFormat()
