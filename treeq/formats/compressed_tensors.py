"""compressed-tensors' ``pack-quantized`` layout (what llm-compressor writes for weight-only integer
schemes, and transformers and vLLM read), to and from treeq's GPTQ layout.

compressed-tensors keeps signed codes q in [-2^(b-1), 2^(b-1) - 1] and signed zero points, and
dequantizes ``(q - zero_point) * scale``; it stores each code plus 2^(b-1) as one little-endian bit
stream along the input features, which for treeq's unsigned codes c = q + 2^(b-1) is the very
stream GPTQ packs, only transposed:

* ``weight_packed`` int32 [out, in * bits / 32] = ``qweight``^T;
* ``weight_scale`` [out, groups] = ``scales``^T (fp16, as treeq computes them);
* ``weight_zero_point`` int32 [out * bits / 32, groups] = ``qzeros``^T, asymmetric schemes only
  (a symmetric one has zero point 0, treeq's middle code);
* ``weight_shape`` int64 [2]: (out, in);
* ``weight_g_idx`` (older compressed-tensors, ``actorder: group``) read, never written: the current
  package has no act-order groups, so treeq exports contiguous groups only.

Converting is exact both ways. Checkpoints that quantize their inputs (W8A8) are written in the
``int-quantized`` layout instead (ct_int_quantized.py).
"""

from __future__ import annotations

import torch

from .. import packing
from ..errors import TreeqError
from ..numerics import INTEGER_ZERO_GRIDS, group_width
from . import ct_int_quantized as int_quantized
from .base import FormatSummary, SingleSchemeFormat

QUANT_METHOD = "compressed-tensors"
LAYOUT = "pack-quantized"
# 3-bit codes straddle words, and compressed-tensors releases have packed them differently.
READABLE_BITS = (2, 4, 8)
WRITABLE_BITS = (4, 8)
# A quantized linear's tensors, as named in checkpoints.
QUANTIZED_STATE = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")


def _linears(tensors: dict[str, torch.Tensor], suffix: str) -> list[str]:
    return [k[: -len(suffix)] for k in tensors if k.endswith(suffix)]


def _middle(bits: int) -> int:
    return 2 ** (bits - 1)


def to_compressed_tensors(tensors: dict[str, torch.Tensor], bits: int, sym: bool, group_size: int) -> dict:
    """A state dict in treeq's GPTQ layout -> the same weights in the pack-quantized layout."""
    out = dict(tensors)
    for name in _linears(tensors, ".qweight"):
        qweight, qzeros = out.pop(f"{name}.qweight"), out.pop(f"{name}.qzeros")
        scales, g_idx = out.pop(f"{name}.scales"), out.pop(f"{name}.g_idx").long()
        n_in = g_idx.numel()
        if not torch.equal(g_idx, torch.arange(n_in, device=g_idx.device) // group_width(group_size, n_in)):
            raise TreeqError(f"{name}: act-order groups (g_idx) cannot be written in the compressed-tensors layout")
        out[f"{name}.weight_packed"] = qweight.T.contiguous()
        out[f"{name}.weight_scale"] = scales.T.contiguous()
        out[f"{name}.weight_shape"] = torch.tensor([scales.shape[1], n_in], dtype=torch.int64)
        if sym:
            zeros = packing.unpack(qzeros.T.contiguous(), bits)
            if bool((zeros != _middle(bits)).any()):
                raise ValueError(f"{name}: zero points other than the middle code in a symmetric scheme")
        else:
            out[f"{name}.weight_zero_point"] = qzeros.T.contiguous()
    return out


def from_compressed_tensors(tensors: dict[str, torch.Tensor], qcfg: dict) -> dict[str, torch.Tensor]:
    """A state dict in the pack-quantized layout -> treeq's GPTQ layout (zero points and g_idx
    made explicit, scales in fp16)."""
    bits, sym, group_size = qcfg["bits"], qcfg["sym"], qcfg["group_size"]
    out = dict(tensors)
    for name in _linears(tensors, ".weight_packed"):
        packed = out.pop(f"{name}.weight_packed")
        n_out, n_in = (int(d) for d in out.pop(f"{name}.weight_shape"))
        scale = out.pop(f"{name}.weight_scale")
        scales = scale.T.to(torch.float16).contiguous()
        if not torch.equal(scales.to(scale.dtype), scale.T):
            raise TreeqError(f"{name}: weight_scale is not exactly representable in fp16, which treeq's kernels take")
        out[f"{name}.qweight"] = packed.T.contiguous()
        out[f"{name}.scales"] = scales
        zero_point = out.pop(f"{name}.weight_zero_point", None)
        if sym:
            middle = torch.full((scales.shape[0], n_out), _middle(bits), dtype=torch.uint8)
            out[f"{name}.qzeros"] = packing.pack(middle.T.contiguous(), bits).T.contiguous()
        elif zero_point is None:
            raise TreeqError(f"{name}: an asymmetric compressed-tensors scheme without weight_zero_point")
        else:
            out[f"{name}.qzeros"] = zero_point.T.contiguous()
        g_idx = out.pop(f"{name}.weight_g_idx", None)
        if g_idx is None:
            g_idx = torch.arange(n_in) // group_width(group_size, n_in)
        out[f"{name}.g_idx"] = g_idx.to(torch.int32)
    return out


def quantization_config(
    bits: int, sym: bool, group_size: int, ignore: list[str], meta: dict, quantized_inputs: bool = False
) -> dict:
    """The quantization_config llm-compressor writes for a weight-only integer scheme, or with
    ``quantized_inputs`` for W8A8 (int8 weights per channel, int8 inputs per token)."""
    weights = {
        "num_bits": bits,
        "type": "int",
        "symmetric": sym,
        "group_size": None if group_size == -1 else group_size,
        "strategy": "channel" if group_size == -1 else "group",
        "dynamic": False,
    }
    layout = int_quantized.LAYOUT if quantized_inputs else LAYOUT
    return {
        "quant_method": QUANT_METHOD,
        "format": layout,
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weights,
                "input_activations": dict(int_quantized.INPUTS) if quantized_inputs else None,
                "output_activations": None,
                "format": layout,
            }
        },
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "meta": meta,
    }


def as_treeq_config(qcfg: dict) -> dict:
    """A compressed-tensors quantization_config in the terms treeq's loader reads."""
    groups = qcfg.get("config_groups") or {}
    fmt = qcfg.get("format")
    if fmt not in (LAYOUT, int_quantized.LAYOUT) or len(groups) != 1:
        raise TreeqError(
            f"compressed-tensors checkpoint with format {fmt!r} and {len(groups)} scheme groups: treeq reads "
            f"one weight-only '{LAYOUT}' or W8A8 '{int_quantized.LAYOUT}' scheme"
        )
    scheme = next(iter(groups.values()))
    weights = scheme.get("weights") or {}
    strategy = weights.get("strategy")
    meta = qcfg.get("meta", {})
    if fmt == int_quantized.LAYOUT:
        # The inputs' scheme, where treeq's loader looks for it, also in checkpoints others wrote.
        activations = int_quantized.activations_of(scheme.get("input_activations") or {})
        meta = {**meta, "settings": {**meta.get("settings", {}), "activations": activations}}
    if (
        (scheme.get("input_activations") is not None) != (fmt == int_quantized.LAYOUT)
        or weights.get("type") != "int"
        or weights.get("num_bits") not in READABLE_BITS
        or strategy not in ("group", "channel")
    ):
        raise TreeqError(
            f"compressed-tensors scheme {weights} (inputs {scheme.get('input_activations')}): treeq reads "
            f"weight-only int{'/'.join(map(str, READABLE_BITS))} schemes with group or channel scales"
        )
    return {
        "quant_method": QUANT_METHOD,
        "checkpoint_format": fmt,
        "bits": weights["num_bits"],
        "group_size": weights["group_size"] if strategy == "group" else -1,
        "sym": bool(weights.get("symmetric", True)),
        "desc_act": weights.get("actorder") in ("group", True),
        "meta": meta,
    }


def linear_shape(packed_shape: tuple[int, int], bits: int) -> tuple[int, int]:
    """(in_features, out_features) of a linear from its weight_packed's shape."""
    return packed_shape[1] * packing.WORD_BITS // bits, packed_shape[0]


class CompressedTensorsFormat(SingleSchemeFormat):
    name = "compressed-tensors"
    quant_methods = (QUANT_METHOD,)
    packed_suffix = ".weight_packed"
    stored_state = QUANTIZED_STATE

    def describe(self, qcfg: dict) -> str:
        return f"compressed-tensors `{qcfg['format']}`"

    def engines(self, qcfg: dict) -> tuple[str, str] | None:
        return "the `compressed-tensors` package", "vllm serve {dir}"

    def refuses(self, config) -> str | None:
        w = config.weights
        if w.bits not in WRITABLE_BITS or w.grid not in INTEGER_ZERO_GRIDS:
            return f"checkpoint_format {self.name!r} holds 4- or 8-bit integer grids, not {w.bits}-bit {w.grid}"
        if config.activations is not None:
            return int_quantized.refuses(config) or super().refuses(config)
        return super().refuses(config)

    def quantization_config(self, config, summary: FormatSummary, meta: dict, unquantized: list[str]) -> dict:
        w, inputs = config.weights, config.activations is not None
        return quantization_config(w.bits, summary.sym, w.group_size, list(unquantized), meta, inputs)

    def to_stored(self, tensors: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
        w = config.weights
        if config.activations is not None:
            return int_quantized.to_int_quantized(tensors)
        return to_compressed_tensors(tensors, w.bits, w.sym, w.group_size)

    def reader_config(self, qcfg: dict) -> dict:
        return as_treeq_config(qcfg)

    def to_runtime(self, state: dict[str, torch.Tensor], qcfg: dict, bits_of) -> dict[str, torch.Tensor]:
        if qcfg["checkpoint_format"] == int_quantized.LAYOUT:
            return int_quantized.from_int_quantized(state)
        return from_compressed_tensors(state, qcfg)

    def linear_shape(self, packed_shape, qcfg: dict) -> tuple[int, int]:
        if qcfg["checkpoint_format"] == int_quantized.LAYOUT:
            return packed_shape[1], packed_shape[0]  # int8 codes [out, in], one per byte
        return linear_shape(packed_shape, qcfg["bits"])

    def codes_owner(self, qcfg: dict, key: str, keys: set[str]) -> str | None:
        if qcfg["checkpoint_format"] != int_quantized.LAYOUT:
            return super().codes_owner(qcfg, key, keys)
        # int8 codes under a full-precision weight's own name, told apart by their scale beside them
        name = key.removesuffix(".weight")
        return name if key.endswith(".weight") and f"{name}.weight_scale" in keys else None


FORMAT = CompressedTensorsFormat()
