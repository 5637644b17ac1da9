"""What a bench ran on, for the lines it prints before its figures: the CPU, the calibration path
(the dtype of the layer forwards, the route of the input statistics) and the kernels the quantized
layers ran. Figures move with each of these, so none is read as another machine's or path's."""

from __future__ import annotations

from collections import Counter

import torch

from treeq.engine.calib_precision import calibration_dtype, cpu_statistics
from treeq.kernels import cpu_isa
from treeq.runtime.quant_linear import QuantLinear


def cpu() -> str:
    return cpu_isa.describe()


def calibration(calib_dtype: str = "auto") -> str:
    """The path a CPU quantization with ``--calib-dtype calib_dtype`` takes on this machine (and
    under ``$TREEQ_CPU_ISA``), as :class:`treeq.methods.InputStats` chooses it."""
    dtype = calibration_dtype(calib_dtype, torch.device("cpu"))
    route = cpu_statistics() if dtype != torch.float32 else "fp32"
    return f"calibration: layer forwards in {str(dtype).removeprefix('torch.')}, input statistics by {route}"


def kernels(model) -> str:
    """The kernel each quantized linear of ``model`` runs, counted: 'cpu_int4_avx512 x 210'. A layer
    chooses its kernel at its first forward (or at load), so call this after the model has run."""
    quantized = [m for m in model.modules() if isinstance(m, QuantLinear)]
    counts = Counter(m.kernel.name if m.kernel is not None else "none chosen yet" for m in quantized)
    return ", ".join(f"{name} x {n}" for name, n in counts.most_common()) or "none (no quantized linear)"


def kv_path(cache) -> str:
    """How a cache's layers store and read keys and values: each layer's class and its key and
    value quantizers, counted (the KV caches have no fused kernel: each step dequantizes in
    PyTorch ops before attention)."""

    def described(layer) -> str:
        if not hasattr(layer, "key_quantizer"):
            return type(layer).__name__
        keys, values = type(layer.key_quantizer).__name__, type(layer.value_quantizer).__name__
        return f"{type(layer).__name__}(keys {keys}, values {values})"

    kinds = ", ".join(f"{name} x {n}" for name, n in Counter(map(described, cache.layers)).most_common())
    return f"KV path: {kinds}; dequantized in PyTorch ops before attention"
