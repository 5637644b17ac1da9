"""The dtype calibration matmuls take their inputs in: the layer forwards and the input statistics.

bf16 matmuls are 3-5x faster than fp32 ones on CPUs with native bf16 (AVX512-BF16, AMX) and on
recent GPUs. The layer forwards autocast; the input statistics round x to bf16 but accumulate
x^T x in fp32 (:class:`treeq.methods.InputStats`). Weights, the residual stream and every method's
own arithmetic stay fp32.
"""

from __future__ import annotations

import torch

CALIB_DTYPES = ("auto", "float32", "bfloat16")


def native_bf16(device: torch.device) -> bool:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        # Private helpers; without them we cannot tell, and emulated bf16 is slower than fp32.
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
    return False


def calibration_dtype(setting: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 where ``device`` computes it natively, else fp32."""
    if setting == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    return getattr(torch, setting)
