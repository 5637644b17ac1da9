"""GPTQ's two zero-point conventions, and what a GPTQ quantization_config says about them.

GPTQ v1 (``format: gptq``, what AutoGPTQ wrote and most published checkpoints hold) stores each
zero point minus one; v2 (``gptq_v2``) stores it as is. The codes, scales and g_idx are the same.
v1 cannot hold a zero point of 0, which asymmetric grids produce, so treeq writes v1 only for
symmetric checkpoints (zero point = the middle code) and v2 for everything else.
"""

from __future__ import annotations

from typing import Callable

import torch

from .. import packing
from ..errors import TreeqError
from ..numerics import INTEGER_ZERO_GRIDS, make_grid
from .base import CheckpointFormat, FormatSummary

V1 = "gptq"
V2 = "gptq_v2"
VERSIONS = (V1, V2)


def _zeros(qzeros: torch.Tensor, bits: int) -> torch.Tensor:
    return packing.unpack(qzeros.T.contiguous(), bits).T.to(torch.int64)


def _packed_zeros(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    return packing.pack(zeros.T.contiguous(), bits).T.contiguous()


def _qzeros_keys(tensors: dict[str, torch.Tensor]) -> list[str]:
    return [k for k in tensors if k.endswith(".qzeros")]


def to_v1(tensors: dict[str, torch.Tensor], bits: int | Callable[[str], int]) -> dict[str, torch.Tensor]:
    """A state dict with v2 zero points -> the same with v1's (zero - 1). ``bits``: every module's,
    or a function of the module's name (per-module overrides)."""
    out = dict(tensors)
    for key in _qzeros_keys(tensors):
        b = _bits(bits, key)
        zeros = _zeros(out[key], b)
        if bool((zeros == 0).any()):
            raise ValueError(f"{key}: a zero point of 0 cannot be written as GPTQ v1; write gptq_v2")
        out[key] = _packed_zeros(zeros - 1, b)
    return out


def _ones(bits: int) -> int:
    """A word with 1 in every whole ``bits``-wide field."""
    return sum(1 << (bits * i) for i in range(packing.WORD_BITS // bits))


def from_v1(tensors: dict[str, torch.Tensor], bits: int | Callable[[str], int]) -> dict[str, torch.Tensor]:
    """Inverse of v1's zero - 1, as GPTQModel undoes it: for 2/4/8 bits one add per word, which also
    undoes the borrow its word-wise subtraction left where a zero point was 0; 3-bit fields
    straddle words, so each is shifted on its own. ``bits`` as for :func:`to_v1`."""
    out = dict(tensors)
    for key in _qzeros_keys(tensors):
        b = _bits(bits, key)
        if packing.WORD_BITS % b:
            out[key] = _packed_zeros((_zeros(out[key], b) + 1) % 2**b, b)
        else:
            words = (out[key].to(torch.int64) + _ones(b)) % 2**packing.WORD_BITS
            out[key] = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return out


def _bits(bits: int | Callable[[str], int], qzeros_key: str) -> int:
    return bits if isinstance(bits, int) else bits(qzeros_key[: -len(".qzeros")])


def stored_version(qcfg: dict) -> str:
    """The zero-point convention a GPTQ checkpoint was written in. GPTQModel reads ``format`` and
    takes ``checkpoint_format`` as its older name; neither means v1. treeq's checkpoints from before
    ``meta.zero_points`` was recorded said ``format: gptq`` beside ``checkpoint_format: gptq_v2``
    and meant v2, so for those the latter wins."""
    fmt, legacy = qcfg.get("format"), qcfg.get("checkpoint_format")
    own_legacy = "treeq_version" in qcfg.get("meta", {}) and "zero_points" not in qcfg.get("meta", {})
    version = legacy if (own_legacy and legacy) else (fmt or legacy or V1)
    if version not in VERSIONS:
        raise TreeqError(f"GPTQ checkpoint format {version!r} is not supported; treeq reads {' and '.join(VERSIONS)}")
    return version


# treeq's own checkpoints that only treeq.load computes correctly (an offset grid, an input
# transform): GPTQ loaders do not know this quant_method, so they refuse instead of misreading.
TREEQ_QUANT_METHOD = "treeq"
# The widths GPTQ loaders (GPTQModel, vLLM) run; 6-bit checkpoints are treeq's own.
GPTQ_LOADER_BITS = (2, 3, 4, 8)
# Method options that GPTQ loaders' quantize_config also names, recorded where a method has them.
GPTQ_METHOD_FIELDS = ("static_groups", "damp_percent")


def other_loaders_run(config) -> bool:
    """Whether GPTQ loaders (GPTQModel, transformers, vLLM) compute what treeq does with this
    checkpoint: integer zero points without a grid offset, widths they know, no input transform, no weight extras
    (they would ignore them and run the dense part alone), no quantized inputs (GPTQ's config has
    no field for them: they would run the weights on full-precision inputs, W8A16 for W8A8)."""
    grids_run = all(s.grid in INTEGER_ZERO_GRIDS and s.bits in GPTQ_LOADER_BITS for s in config.all_schemes())
    method = config.method_class()
    plain = not method.adds_input_transform and not method.adds_weight_extras
    return grids_run and plain and config.activations is None


def zero_point_version(config) -> str:
    """GPTQ v1 for symmetric checkpoints other loaders run (unless v2 is asked for); v2 otherwise,
    since v1 cannot hold an asymmetric zero point of 0."""
    all_sym = all(s.sym for s in config.all_schemes())
    v1 = config.checkpoint.gptq_version == 1 and all_sym and other_loaders_run(config)
    return V1 if v1 else V2


def dynamic(config, summary: FormatSummary) -> dict:
    """Per-module overrides in GPTQModel's and vLLM's ``dynamic`` form: "-:" skips, "+:" changes
    fields; patterns keep their meaning, since both sides match with re.match, first match first.
    An override's sym=True is written as False where a module it decides holds zero points its
    method learned (``summary.learned_zeros``): a loader taking sym=True ignores the zero points."""
    moved = {id(config.override_of(name)) for name in summary.learned_zeros}
    entries = {}
    for o in config.overrides:
        changes = o.changes()
        if changes.get("sym") and id(o) in moved:
            changes["sym"] = False
        entries[("-:" if o.skip else "+:") + o.pattern] = changes
    return entries


class GPTQFormat(CheckpointFormat):
    """GPTQ's layout, the one treeq computes in: every setting fits, act-order and overrides too."""

    name = "gptq"
    quant_methods = ("gptq", TREEQ_QUANT_METHOD)
    stored_state = ("qweight", "qzeros", "scales", "g_idx")

    def describe(self, qcfg: dict) -> str:
        if qcfg["quant_method"] == TREEQ_QUANT_METHOD:
            return f"treeq's own (`quant_method: {TREEQ_QUANT_METHOD}`, GPTQ layout, `format: {qcfg['format']}`)"
        return f"GPTQ, `format: {qcfg['format']}`"

    def engines(self, qcfg: dict) -> tuple[str, str] | None:
        if qcfg["quant_method"] == TREEQ_QUANT_METHOD:
            return None
        return "the `gptqmodel` package", "vllm serve {dir} --dtype float16"

    def quantization_config(self, config, summary: FormatSummary, meta: dict, unquantized: list[str]) -> dict:
        if summary.transform is not None and other_loaders_run(config):
            raise ValueError(f"{config.method} wrote an input transform it does not declare (adds_input_transform)")
        if summary.extras and other_loaders_run(config):
            raise ValueError(f"{config.method} wrote weight extras it does not declare (adds_weight_extras)")
        version, w = zero_point_version(config), config.weights
        options = config.method_class().parse_options(config.options)
        method_fields = {k: v for k, v in (options.model_dump() if options else {}).items() if k in GPTQ_METHOD_FIELDS}
        qcfg = {
            "quant_method": "gptq" if other_loaders_run(config) else TREEQ_QUANT_METHOD,
            # GPTQModel reads `format`, older tools `checkpoint_format`: both say the same.
            "format": version,
            "checkpoint_format": version,
            "pack_dtype": "int32",
            "bits": w.bits,
            "group_size": w.group_size,
            "desc_act": summary.desc_act,
            "sym": summary.sym,
            **method_fields,
            "true_sequential": config.calibration.true_sequential,
            **make_grid(w.grid, w.bits, w.sym).describe(),
            "meta": {**meta, "zero_points": version},
        }
        if config.overrides:
            qcfg["dynamic"] = dynamic(config, summary)
        if summary.transform is not None:
            # y = transform(x) @ dequant(qweight)^T, the transform's buffers stored per module.
            qcfg["input_transform"] = summary.transform
        if summary.extras:
            # Tensors beside the four per module, stored under its prefix (treeq.extras).
            qcfg["weight_extras"] = list(summary.extras)
        return qcfg

    def to_stored(self, tensors: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
        if zero_point_version(config) == V1:
            return to_v1(tensors, lambda name: config.quantized_scheme(name).bits)
        return tensors

    def reader_config(self, qcfg: dict) -> dict:
        if qcfg.get("pack_dtype", "int32") != "int32":
            raise TreeqError(f"pack_dtype {qcfg['pack_dtype']!r} is not supported; treeq reads int32 words")
        version = stored_version(qcfg)
        return {**qcfg, "format": version, "checkpoint_format": version, "meta": qcfg.get("meta", {})}

    def to_runtime(self, state: dict[str, torch.Tensor], qcfg: dict, bits_of) -> dict[str, torch.Tensor]:
        return from_v1(state, bits_of) if qcfg["checkpoint_format"] == V1 else state

    def linear_shape(self, packed_shape, qcfg: dict) -> tuple[int, int]:
        return packed_shape[0] * packing.WORD_BITS // qcfg["bits"], packed_shape[1]


FORMAT = GPTQFormat()
