"""Triton dequantize and dequantize-matmul for the GPTQ layout of ``treeq.packing``.

Codes are read straight from the packed little-endian bit stream (a 3-bit code may straddle two
words) and dequantized as ``(code - zero) * scale`` in fp32, the order ``treeq.numerics`` fixes, so
the dequantize kernel reproduces ``dequantize_grouped`` bit for bit. Groups are looked up per input
row through ``g_idx``, which makes act-order, any group size and group size -1 one code path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

WORD_BITS: tl.constexpr = tl.constexpr(32)


@triton.jit
def _bitfield(words_ptr, offs, next_word, shift, mask, BITS: tl.constexpr):
    """Codes whose low bits start ``shift`` bits into the word at ``words_ptr + offs``; the word
    after it (for codes that straddle a boundary) is ``next_word`` elements further on."""
    shift = shift.to(tl.uint32)
    low = tl.load(words_ptr + offs, mask=mask, other=0).to(tl.uint32, bitcast=True)
    value = low >> shift
    if WORD_BITS % BITS != 0:
        straddles = shift > WORD_BITS - BITS
        high = tl.load(words_ptr + offs + next_word, mask=mask & straddles, other=0).to(tl.uint32, bitcast=True)
        # high is 0 where the code fits one word, so the (then meaningless) shift adds nothing.
        high_shift = (tl.full(shift.shape, WORD_BITS, tl.uint32) - shift) & (WORD_BITS - 1)
        value = value | (high << high_shift)
    return (value & ((1 << BITS) - 1)).to(tl.int32)


@triton.jit
def _weight_tile(
    qweight_ptr,
    qzeros_ptr,
    scales_ptr,
    g_idx_ptr,
    offs_k,
    offs_n,
    K,
    N,
    stride_qw,
    stride_qz,
    stride_s,
    BITS: tl.constexpr,
):
    """fp32 W^T tile [len(offs_k), len(offs_n)]: (code - zero) * scale with each row's group from g_idx."""
    mask_k = offs_k < K
    mask = mask_k[:, None] & (offs_n < N)[None, :]
    k_bits = offs_k * BITS
    codes = _bitfield(
        qweight_ptr,
        (k_bits // WORD_BITS)[:, None] * stride_qw + offs_n[None, :],
        stride_qw,
        (k_bits % WORD_BITS)[:, None],
        mask,
        BITS,
    )
    group = tl.load(g_idx_ptr + offs_k, mask=mask_k, other=0)[:, None]
    n_bits = offs_n * BITS
    zeros = _bitfield(
        qzeros_ptr, group * stride_qz + (n_bits // WORD_BITS)[None, :], 1, (n_bits % WORD_BITS)[None, :], mask, BITS
    )
    scales = tl.load(scales_ptr + group * stride_s + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    return (codes.to(tl.float32) - zeros.to(tl.float32)) * scales


@triton.jit
def _dequantize_kernel(
    out_ptr,
    qweight_ptr,
    qzeros_ptr,
    scales_ptr,
    g_idx_ptr,
    N,
    K,
    stride_out,
    stride_qw,
    stride_qz,
    stride_s,
    BITS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    w = _weight_tile(
        qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, offs_k, offs_n, K, N, stride_qw, stride_qz, stride_s, BITS
    )
    mask = (offs_k < K)[:, None] & (offs_n < N)[None, :]
    out = out_ptr + offs_n[None, :] * stride_out + offs_k[:, None]
    tl.store(out, w.to(out_ptr.dtype.element_ty), mask=mask)


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): small-M tiles for decode, larger ones for prefill.
_TILES = [
    (16, 64, 64, 4, 3),
    (16, 128, 32, 4, 4),
    (16, 32, 128, 2, 4),
    (32, 64, 64, 4, 3),
    (64, 64, 32, 4, 4),
    (64, 128, 64, 8, 3),
    (128, 128, 32, 8, 3),
]
CONFIGS = [
    triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s) for m, n, k, w, s in _TILES
]


def _fitting_rows(configs, named_args, **_):
    """Only tiles no taller than the (bucketed) row count, so decode never times 128-row tiles."""
    rows = max(named_args["M_BUCKET"], 16)
    return [c for c in configs if c.kwargs["BLOCK_M"] <= rows]


def _untimed(kernel_call, quantiles):
    """The interpreter's timings mean nothing (numpy on the host); report a tie so the first
    fitting config runs and no config is executed just to be timed."""
    return [0.0] * len(quantiles)


@triton.jit
def _matmul_kernel(
    x_ptr,
    y_ptr,
    qweight_ptr,
    qzeros_ptr,
    scales_ptr,
    g_idx_ptr,
    M,
    N,
    K,
    M_BUCKET,
    stride_x,
    stride_y,
    stride_qw,
    stride_qz,
    stride_s,
    BITS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x_mask = (offs_m < M)[:, None] & (offs_k < K)[None, :]
        x = tl.load(x_ptr + offs_m[:, None] * stride_x + offs_k[None, :], mask=x_mask, other=0.0)
        w = _weight_tile(
            qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, offs_k, offs_n, K, N, stride_qw, stride_qz, stride_s, BITS
        )
        # The weight is rounded to the activation dtype as the reference kernel rounds it; fp32
        # stays true fp32 (no TF32), matching F.linear's default.
        acc = tl.dot(x, w.to(x.dtype), acc, input_precision="ieee")
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_y + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


_autotuned_matmul = triton.autotune(
    configs=CONFIGS,
    key=["M_BUCKET", "N", "K"],
    prune_configs_by={"early_config_prune": _fitting_rows},
    do_bench=_untimed if triton.knobs.runtime.interpret else None,
)(_matmul_kernel)


def _packed_args(qweight, qzeros, scales, g_idx):
    qweight, qzeros, scales, g_idx = (t.contiguous() for t in (qweight, qzeros, scales, g_idx))
    return (qweight, qzeros, scales, g_idx), (qweight.stride(0), qzeros.stride(0), scales.stride(0))


def dequantize(qweight, qzeros, scales, g_idx, bits: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Weight [out, in] in ``dtype`` (fp32 is bit-exact with ``numerics.dequantize_grouped``)."""
    n, k = scales.shape[1], g_idx.shape[0]
    out = torch.empty(n, k, dtype=dtype, device=qweight.device)
    tensors, strides = _packed_args(qweight, qzeros, scales, g_idx)
    block_n, block_k = 64, 64
    grid = (triton.cdiv(k, block_k), triton.cdiv(n, block_n))
    _dequantize_kernel[grid](out, *tensors, n, k, out.stride(0), *strides, bits, BLOCK_N=block_n, BLOCK_K=block_k)
    return out


def matmul(
    x: torch.Tensor, qweight, qzeros, scales, g_idx, bits: int, config: triton.Config | None = None
) -> torch.Tensor:
    """x [M, in] @ W^T in x's dtype; ``config`` pins one tile config instead of autotuning."""
    x = x.contiguous()
    m, k = x.shape
    n = scales.shape[1]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    tensors, strides = _packed_args(qweight, qzeros, scales, g_idx)
    args = (x, y, *tensors, m, n, k, triton.next_power_of_2(m), x.stride(0), y.stride(0), *strides, bits)

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))

    if config is None:
        _autotuned_matmul[grid](*args)
    else:
        _matmul_kernel[grid](*args, num_warps=config.num_warps, num_stages=config.num_stages, **config.kwargs)
    return y
