"""Triton int8 x int8 matmul with the W8A8 epilogue, for CUDA.

``y = (sum_k x_q[m, k] * w_q[n, k]) * x_scale[m] * w_scale[n] + bias[n]``: the integer sums are
exact (int32 accumulation), then scaled in fp32 in the order of
:func:`treeq.kernels.w8a8_vnni.int8_linear_reference`, so on the same integers the kernel's fp32
output equals that reference bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_M, BLOCK_N, BLOCK_K = 16, 32, 32


@triton.jit
def _int8_matmul_kernel(
    x_ptr,
    w_ptr,
    x_scale_ptr,
    w_scale_ptr,
    bias_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_x,
    stride_w,
    stride_y,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_x + offs_k[None, :], mask=(offs_m < M)[:, None] & mask_k[None, :], other=0
        )
        w = tl.load(
            w_ptr + offs_n[None, :] * stride_w + offs_k[:, None], mask=mask_k[:, None] & (offs_n < N)[None, :], other=0
        )
        acc += tl.dot(x, w, out_dtype=tl.int32)
    x_scale = tl.load(x_scale_ptr + offs_m, mask=offs_m < M, other=0.0)
    w_scale = tl.load(w_scale_ptr + offs_n, mask=offs_n < N, other=0.0)
    y = acc.to(tl.float32) * x_scale[:, None] * w_scale[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0)[None, :]
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_y + offs_n[None, :], y, mask=mask)


def int8_linear(
    x_codes: torch.Tensor,
    x_scale: torch.Tensor,
    w_int8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """x_codes int8 [M, K] (x_scale fp32 [M]) times w_int8 int8 [N, K] (w_scale fp32 [N])^T, in
    ``out_dtype`` after the fp32 epilogue."""
    m, k = x_codes.shape
    n = w_int8.shape[0]
    y = torch.empty(m, n, dtype=torch.float32, device=x_codes.device)
    x_codes, w_int8 = x_codes.contiguous(), w_int8.contiguous()
    x_scale, w_scale = x_scale.float().contiguous(), w_scale.float().contiguous()
    b = bias.float().contiguous() if bias is not None else w_scale  # unread without HAS_BIAS
    grid = (triton.cdiv(m, BLOCK_M), triton.cdiv(n, BLOCK_N))
    _int8_matmul_kernel[grid](
        x_codes, w_int8, x_scale, w_scale, b, y, m, n, k, x_codes.stride(0), w_int8.stride(0), y.stride(0),
        bias is not None, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
    )  # fmt: skip
    return y.to(out_dtype)
