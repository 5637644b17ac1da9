"""Long prompts through a bf16 GEMM over a quantized weight, dequantized one block of output rows
at a time.

From some dozens of tokens on a GEMM library outruns the fused 4-bit kernels (their cost grows
with the tokens while a GEMM's per-token cost falls), yet a resident bf16 copy of every weight
would undo the point of 4 bits. So a block of ``GEMM_ROWS`` rows is expanded into a reused buffer
and multiplied while it is still in cache; the product is the plain bf16 ``F.linear`` the bf16
model runs, on the weight the reference kernel dequantizes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

# 512 rows of a 4096-wide layer are 4 MiB of bf16: few enough GEMM calls that their overhead is
# lost in the product, small enough that the block is still cached when multiplied.
GEMM_ROWS = 512


def blocked_gemm(x: torch.Tensor, n: int, dequantize: Callable[[int, int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """bf16 [M, n] = bf16 x [M, K] @ W^T, where ``dequantize(lo, hi, out)`` writes W's rows lo..hi
    into the bf16 buffer ``out`` [hi - lo, K] and returns it; lo and hi are multiples of 16."""
    rows = min(GEMM_ROWS, n)
    buf = torch.empty(rows, x.shape[1], dtype=torch.bfloat16)
    if rows == n:
        return F.linear(x, dequantize(0, n, buf))
    y = torch.empty(x.shape[0], n, dtype=torch.bfloat16)
    for lo in range(0, n, rows):
        hi = min(lo + rows, n)
        y[:, lo:hi] = F.linear(x, dequantize(lo, hi, buf[: hi - lo]))
    return y
