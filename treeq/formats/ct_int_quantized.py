"""compressed-tensors' ``int-quantized`` layout: what llm-compressor writes for W8A8 (its ``W8A8`` /
``INT8`` preset: int8 per-channel symmetric weights, int8 per-token dynamic symmetric inputs), to and
from treeq's GPTQ layout. The compressed-tensors format file (compressed_tensors.py) picks it for
checkpoints that quantize their inputs.

* ``weight`` int8 [out, in] = code - 128: a symmetric 8-bit weight's zero point is the middle
  code, so its codes are the signed values compressed-tensors dequantizes as ``weight * scale``;
* ``weight_scale`` [out, 1] = ``scales``^T (fp16, as treeq computes them);
* no zero point (symmetric) and no input scale (ranges are taken from each token at run time).

A scale migration (SmoothQuant) is already folded into the weights and the feeding norms or
linears when they are written, so nothing else is stored. The inputs' levels are one scheme with
engines' own arithmetic: vLLM's int8 kernels and treeq take amax / 127 per token; compressed-tensors'
reference fake-quant (transformers without vLLM) takes amax / 127.5 and clamps to [-128, 127].
"""

from __future__ import annotations

import torch

from .. import packing
from ..errors import TreeqError
from ..numerics import INTEGER_ZERO_GRIDS

LAYOUT = "int-quantized"
BITS = 8
MIDDLE = 2 ** (BITS - 1)
INPUTS = {"num_bits": BITS, "type": "int", "symmetric": True, "group_size": None, "strategy": "token", "dynamic": True}
# The ActivationScheme (treeq/schemes.py) the INPUTS describe, field by field.
ACTIVATIONS = {"bits": BITS, "granularity": "per-token", "sym": True, "dynamic": True, "outlier_threshold": None}


def refuses(config) -> str | None:
    """Why a config with quantized inputs has no exact int-quantized form; None when it has."""
    w, a = config.weights, config.activations
    if (w.bits, w.group_size, w.sym) != (BITS, -1, True) or w.grid not in INTEGER_ZERO_GRIDS:
        return (
            f"compressed-tensors '{LAYOUT}' holds int8 per-channel symmetric weights with quantized inputs, "
            f"not {w.bits}-bit group_size={w.group_size} sym={w.sym} {w.grid}"
        )
    settings = {k: getattr(a, k) for k in ACTIVATIONS}
    if settings != ACTIVATIONS or a.grid != "uniform":
        return (
            f"compressed-tensors '{LAYOUT}' holds int8 per-token dynamic symmetric inputs without fp outlier "
            f"columns, not {a.describe()}; write checkpoint_format 'gptq' (treeq's own)"
        )
    return None


def to_int_quantized(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict in treeq's GPTQ layout (8-bit, one group per row, symmetric) -> int-quantized."""
    out = dict(tensors)
    for name in [k.removesuffix(".qweight") for k in tensors if k.endswith(".qweight")]:
        codes = packing.unpack(out.pop(f"{name}.qweight"), BITS)
        zeros = packing.unpack(out.pop(f"{name}.qzeros").T.contiguous(), BITS)
        scales = out.pop(f"{name}.scales")
        out.pop(f"{name}.g_idx")
        if scales.shape[0] != 1 or bool((zeros != MIDDLE).any()):
            raise ValueError(f"{name}: int-quantized needs one symmetric scale per row")
        out[f"{name}.weight"] = (codes.T.to(torch.int16) - MIDDLE).to(torch.int8).contiguous()
        out[f"{name}.weight_scale"] = scales.T.contiguous()
    return out


def from_int_quantized(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """int-quantized -> treeq's GPTQ layout (middle-code zero points, contiguous g_idx, fp16 scales)."""
    out = dict(tensors)
    for name in [k.removesuffix(".weight_scale") for k in tensors if k.endswith(".weight_scale")]:
        weight, scale = out.pop(f"{name}.weight"), out.pop(f"{name}.weight_scale")
        if weight.dtype != torch.int8 or scale.shape != (weight.shape[0], 1):
            raise TreeqError(f"{name}: int-quantized weights are int8 [out, in] with one scale per row")
        scales = scale.T.to(torch.float16).contiguous()
        if not torch.equal(scales.to(scale.dtype), scale.T):
            raise TreeqError(f"{name}: weight_scale is not exactly representable in fp16, which treeq's kernels take")
        out[f"{name}.qweight"] = packing.pack((weight.to(torch.int16) + MIDDLE).T.contiguous(), BITS)
        out[f"{name}.scales"] = scales
        out[f"{name}.qzeros"] = packing.pack(torch.full((weight.shape[0], 1), MIDDLE), BITS).T.contiguous()
        out[f"{name}.g_idx"] = torch.zeros(weight.shape[1], dtype=torch.int32)
    return out


def activations_of(inputs: dict) -> dict:
    """The ActivationScheme fields of a stored ``input_activations``; refused unless it says what
    INPUTS says (its other QuantizationArgs fields, observers and the like, change no output)."""
    if any(inputs.get(k) != v for k, v in INPUTS.items() if k != "group_size"):
        raise TreeqError(f"compressed-tensors input_activations {inputs}: treeq runs int8 per-token dynamic symmetric")
    return dict(ACTIVATIONS)
