"""What a checkpoint holds, read from its files without building the model: format, size against
the fp16 model, each module's stored format, bits per weight and the kernel loading would choose."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import extras as weight_extras
from .. import user_input
from ..kernels import LinearFormat, explain, select_kernel
from ..runtime.quant_linear import QuantLinear
from ..schemes import KVCacheScheme
from .kv_checkpoint import KV_CALIBRATION_NAME
from .loading import (
    checkpoint_weight_files,
    linear_format_from,
    linear_shape,
    quantized_module_qcfg,
    read_quantization_config,
    recorded_scheme,
    stored_format,
    weight_files,
)


@dataclass
class CheckpointInfo:
    path: Path
    quantization: dict
    size_bytes: int
    fp16_bytes: int
    kernels: dict[str, str]  # module -> chosen kernel
    rejected: dict[str, dict[str, str]]  # kernel -> {module: reason}, for --explain
    formats: dict[str, LinearFormat]  # module -> its stored format (bits, groups, grid...)
    # module -> bits per weight, counted from every stored tensor of its weight (codes, scales,
    # zero points, indices, an input transform's buffers, weight extras)
    bits_per_weight: dict[str, float]
    extras: dict[str, str]  # module -> what its weight extras hold (treeq.extras), where it has some
    kv_cache: KVCacheScheme | None = None  # the KV-cache scheme stored with the checkpoint
    kv_calibration: str | None = None  # the file holding its calibration, where it needs one

    @property
    def mean_bits_per_weight(self) -> float:
        """Stored bits of every quantized linear over their weights, all linears together."""
        weights = {n: f.in_features * f.out_features for n, f in self.formats.items()}
        return sum(self.bits_per_weight[n] * w for n, w in weights.items()) / sum(weights.values())


SAFETENSORS_BITS = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "I16": 16, "I8": 8, "U8": 8}


def _stored_extras(f, keys: set[str], name: str, module: dict):
    """The weight extras module ``name`` stores, recognised in the runtime layout its format converts
    to; its tensors are read only where it stores some extras tensor (plain layouts read headers)."""
    own = {k for k in keys if k.startswith(f"{name}.")}
    if not any(k.rpartition(".")[2] in weight_extras.NAMES for k in own):
        return None
    runtime = stored_format(module).to_runtime({k: f.get_tensor(k) for k in own}, module, lambda _: module["bits"])
    return weight_extras.stored_for(name, runtime)


def _opened(weights: Path):
    """``weights`` opened for reading tensor headers, or one line saying it cannot be read."""
    from safetensors import safe_open

    try:
        return safe_open(weights, "pt")
    except user_input.READ_ERRORS as e:
        raise user_input.unreadable_weights(weights, e) from None


def inspect_checkpoint(path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> CheckpointInfo:
    """Format, size on disk against the same model in fp16, and each module's kernel."""
    path = user_input.local_path(path, "checkpoint")
    qcfg = read_quantization_config(path)
    stored = stored_format(qcfg)
    quantized_state = (*QuantLinear.QUANTIZED_STATE, *stored.stored_state)
    fp16_bytes = 0
    kernels: dict[str, str] = {}
    rejected: dict[str, dict[str, str]] = {}
    formats: dict[str, LinearFormat] = {}
    stored_bits: Counter = Counter()  # module -> bits of every tensor that stores its weight
    extras: dict[str, str] = {}
    for weights in checkpoint_weight_files(path):
        with _opened(weights) as f:
            keys = set(f.keys())
            for key in f.keys():
                tensor = f.get_slice(key)
                shape = tensor.get_shape()
                owner, _, leaf = key.rpartition(".")
                name = stored.codes_owner(qcfg, key, keys)
                if leaf in quantized_state or name is not None:
                    stored_bits[owner] += math.prod(shape) * SAFETENSORS_BITS[tensor.get_dtype()]
                if name is not None:
                    module = quantized_module_qcfg(qcfg, name)
                    in_f, out_f = linear_shape(module, shape)
                    held = _stored_extras(f, keys, name, module)
                    if held is not None:
                        extras[name] = held.describe(in_f, out_f)
                    fmt = linear_format_from(module, in_f, out_f, held and held.kind)
                    formats[name] = fmt
                    fp16_bytes += in_f * out_f * 2
                    reasons = explain(fmt, device, dtype)
                    kernels[name] = select_kernel(fmt, device, dtype, reasons=reasons).name
                    for kname, reason in reasons.items():
                        if reason:
                            rejected.setdefault(kname, {})[name] = reason
                elif key.rpartition(".")[2] not in quantized_state:
                    fp16_bytes += math.prod(shape) * 2
    size = sum(p.stat().st_size for p in weight_files(path))
    per_weight = {n: stored_bits[n] / (f.in_features * f.out_features) for n, f in formats.items()}
    kv = recorded_scheme(qcfg, "kv_cache", KVCacheScheme)
    calibration = KV_CALIBRATION_NAME if (path / KV_CALIBRATION_NAME).is_file() else None
    return CheckpointInfo(path, qcfg, size, fp16_bytes, kernels, rejected, formats, per_weight, extras, kv, calibration)
