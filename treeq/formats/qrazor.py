"""QRazor's compact checkpoint: 4-bit codes, a small shift per group and one fp16 scale per row.

The qrazor grid (:class:`treeq.numerics.QRazorGrid`) dequantizes as (code - 2^(b-1)) * r * 2^shift,
so in memory it is treeq's GPTQ layout with group scale r * 2^shift and a constant zero point.
Stored, each quantized linear holds:

* ``qweight``: the codes, packed as GPTQ packs them (int32 words along the input dimension);
* ``shifts``: each (group, output row)'s shift, ``shift_bits`` wide, the [groups, out] grid
  flattened and packed into int32 words (padded with zeros to whole words);
* ``row_scale``: fp16 [out], the smallest group scale of each row (r * 2^(least shift));
* ``g_idx``: each input channel's group (act-order groups stay possible).

No zero points are stored: every one is 2^(b-1). Converting is exact both ways: where the group
scales are r * 2^k, a scale over its row's smallest is a power of two, which IEEE division returns
exactly, and r * 2^k is exact in fp16 unless it overflows, which the grid never writes (subnormal
r included). Layouts whose scales are not of this form are refused, not rounded.
"""

from __future__ import annotations

import torch

from .. import packing
from ..errors import TreeqError
from ..numerics import SCALE_DTYPE, QRazorGrid, group_width
from .base import CheckpointFormat, FormatSummary
from .gptq import dynamic

QUANT_METHOD = "qrazor"
SHIFT_BITS = QRazorGrid.SHIFT_BITS


def _linears(tensors: dict[str, torch.Tensor]) -> list[str]:
    return [k[: -len(".qweight")] for k in tensors if k.endswith(".qweight")]


def shifts_of(scales: torch.Tensor, name: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """(shift int64 [groups, out], row_scale fp16 [out]) with scales == row_scale * 2^shift exactly;
    raises naming the module where a row's scales are not its smallest times powers of two that
    ``SHIFT_BITS`` bits hold."""
    s = scales.float()
    row = s.amin(dim=0)
    mantissa, exp = torch.frexp(s / row)  # a power of two 2^k is 0.5 * 2^(k+1)
    shift = exp.to(torch.int64) - 1
    if not bool((row > 0).all() and (mantissa == 0.5).all() and (shift < 2**SHIFT_BITS).all()):
        raise TreeqError(
            f"{name}: group scales are not a row scale times powers of two up to 2^{2**SHIFT_BITS - 1}; "
            "only the qrazor grid can be written as checkpoint_format 'qrazor'"
        )
    return shift, row.to(SCALE_DTYPE)


def to_qrazor(tensors: dict[str, torch.Tensor], bits_of) -> dict[str, torch.Tensor]:
    """A state dict in treeq's GPTQ layout -> the compact QRazor layout (``bits_of(module)``)."""
    out = dict(tensors)
    for name in _linears(tensors):
        bits = bits_of(name)
        zeros = packing.unpack(out.pop(f"{name}.qzeros").T.contiguous(), bits).T
        if not bool((zeros == 2 ** (bits - 1)).all()):
            raise TreeqError(f"{name}: zero points other than {2 ** (bits - 1)} cannot be written as 'qrazor'")
        shift, row = shifts_of(out.pop(f"{name}.scales"), name)
        out[f"{name}.shifts"] = packing.pack_flat(shift, SHIFT_BITS)
        out[f"{name}.row_scale"] = row
    return out


def from_qrazor(tensors: dict[str, torch.Tensor], qcfg: dict, bits_of) -> dict[str, torch.Tensor]:
    """Inverse of :func:`to_qrazor`: group scales row_scale * 2^shift (fp16), zero points 2^(b-1)."""
    out = dict(tensors)
    for name in _linears(tensors):
        bits = bits_of(name)
        n_in = out[f"{name}.qweight"].shape[0] * packing.WORD_BITS // bits
        row = out.pop(f"{name}.row_scale")
        groups = n_in // group_width(qcfg["group_size"], n_in)
        shift = packing.unpack_flat(out.pop(f"{name}.shifts"), SHIFT_BITS, (groups, row.shape[0]))
        out[f"{name}.scales"] = (row.float() * torch.exp2(shift.float())).to(SCALE_DTYPE)
        zeros = torch.full((groups, row.shape[0]), 2 ** (bits - 1), dtype=torch.int64, device=row.device)
        out[f"{name}.qzeros"] = packing.pack(zeros.T.contiguous(), bits).T.contiguous()
    return out


class QRazorFormat(CheckpointFormat):
    """treeq-only: no other engine reads ``quant_method: qrazor`` (the GPTQ layout of the same
    weights, ``checkpoint_format gptq``, runs in GPTQ engines)."""

    name = "qrazor"
    quant_methods = (QUANT_METHOD,)
    stored_state = ("qweight", "shifts", "row_scale", "g_idx")

    def refuses(self, config) -> str | None:
        schemes = config.all_schemes()
        grids = sorted({s.grid for s in schemes} - {QRazorGrid.name})
        if grids:
            return f"checkpoint_format 'qrazor' holds the qrazor grid only, not {', '.join(grids)}; use 'gptq'"
        if len({(s.bits, s.group_size) for s in schemes}) > 1:
            return "checkpoint_format 'qrazor' holds one bits and group_size for every module; use 'gptq'"
        method = config.method_class()
        held = {"input transform": method.adds_input_transform, "weight extras": method.adds_weight_extras}
        for part, holds in held.items():
            if holds:
                return f"checkpoint_format 'qrazor' cannot hold {config.method}'s {part}; use 'gptq'"
        return None

    def quantization_config(self, config, summary: FormatSummary, meta: dict, unquantized: list[str]) -> dict:
        w = config.weights
        qcfg = {
            "quant_method": QUANT_METHOD,
            "bits": w.bits,
            "group_size": w.group_size,
            "desc_act": summary.desc_act,
            "sym": True,
            **QRazorGrid(w.bits).describe(),
            "meta": meta,
        }
        if config.overrides:  # only skips pass refuses(); loaders read them as GPTQModel's dynamic
            qcfg["dynamic"] = dynamic(config, summary)
        return qcfg

    def to_stored(self, tensors: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
        return to_qrazor(tensors, lambda name: config.quantized_scheme(name).bits)

    def reader_config(self, qcfg: dict) -> dict:
        shift_bits = qcfg.get("shift_bits", SHIFT_BITS)
        if shift_bits != SHIFT_BITS:
            raise TreeqError(f"qrazor checkpoint with shift_bits={shift_bits}; this treeq reads {SHIFT_BITS}")
        return {**qcfg, "grid": QRazorGrid.name, "meta": qcfg.get("meta", {})}

    def to_runtime(self, state: dict[str, torch.Tensor], qcfg: dict, bits_of) -> dict[str, torch.Tensor]:
        return from_qrazor(state, qcfg, bits_of)

    def linear_shape(self, packed_shape, qcfg: dict) -> tuple[int, int]:
        return packed_shape[0] * packing.WORD_BITS // qcfg["bits"], packed_shape[1]

    def describe(self, qcfg: dict) -> str:
        return (
            f"QRazor (`quant_method: {QUANT_METHOD}`): {qcfg['bits']}-bit codes, a {SHIFT_BITS}-bit shift per "
            f"group of {qcfg['group_size']}, one fp16 scale per row"
        )

    def engines(self, qcfg: dict) -> tuple[str, str] | None:
        return None


FORMAT = QRazorFormat()
