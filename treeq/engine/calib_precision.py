"""The dtype calibration matmuls take their inputs in: the layer forwards and the input statistics.

bf16 matmuls are 3-5x faster than fp32 ones on CPUs with native bf16 (AVX512-BF16, AMX) and on
recent GPUs. The layer forwards autocast; the input statistics round x to bf16 but accumulate
x^T x in fp32 (:class:`treeq.methods.InputStats`), by the route :func:`cpu_statistics` names.
Weights, the residual stream and every method's own arithmetic stay fp32.
"""

from __future__ import annotations

import torch

from ..kernels import cpu_isa, gram_bf16

CALIB_DTYPES = ("auto", "float32", "bfloat16")


def _cpu_has(level: str) -> bool:
    # Private torch helpers; without them we cannot tell, and emulated bf16 is slower than fp32.
    check = {"amx": "_is_amx_tile_supported", "avx512_bf16": "_is_avx512_bf16_supported"}[level]
    return cpu_isa.allows(level) and getattr(torch.cpu, check, lambda: False)()


def native_bf16(device: torch.device) -> bool:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return _cpu_has("amx") or _cpu_has("avx512_bf16")
    return False


def calibration_dtype(setting: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 where ``device`` computes it natively, else fp32."""
    if setting == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    return getattr(torch, setting)


def cpu_statistics() -> str:
    """How this CPU accumulates x^T x of bf16-rounded x in fp32, fastest first:

    - ``onednn``: AMX; an fp32 matmul in oneDNN's bf16 mode (CPUs without AMX ignore that mode);
    - ``kernel``: AVX512-BF16; treeq's own kernel (:mod:`treeq.kernels.gram_bf16`);
    - ``fp32``: neither (or the kernel could not be built); the fp32 matmul of the rounded inputs,
      exact but at fp32 speed. ``auto`` calibrates such CPUs in fp32 anyway.

    ``$TREEQ_CPU_ISA`` (:mod:`treeq.kernels.cpu_isa`) forces the later routes on a newer CPU.
    """
    if _cpu_has("amx"):
        return "onednn"
    if _cpu_has("avx512_bf16") and gram_bf16.library()[0] is not None:
        return "kernel"
    return "fp32"
