"""Long prompts through a bf16 (or fp32) GEMM over a quantized weight, dequantized a block of output
rows at a time into a reused buffer.

From some dozens of tokens on a GEMM library outruns the fused kernels (their cost grows with the
tokens while a GEMM's per-token cost falls), yet a resident bf16 copy of every weight would undo the
point of quantizing. The product is the bf16 GEMM the bf16 model runs, on the weight the reference
kernel dequantizes. BCQ's dense path (:mod:`.cpu_lut_bcq`) runs the same in fp32, in plain rows.

bf16 ``F.linear`` repacks its whole weight into oneDNN's blocked layout at every call (oneDNN's
"copy_B"). Where oneDNN takes weights in the layout ``ONEDNN`` names, the dequantizers write that
layout straight into a prepacked oneDNN buffer, so the dequantization stands in for that repacking
instead of adding to it. Elsewhere (another oneDNN, a shape it pads) the block is written row by row
and goes through ``F.linear``.

Memory: each thread keeps one buffer per block shape and dtype, of at most ``GEMM_BYTES`` (bf16) or
``FP32_GEMM_BYTES``, reused by every call (a model's layers share a handful of shapes).
"""

from __future__ import annotations

import ctypes
import functools
import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F

# Largest block. oneDNN's GEMM slowed down on blocks narrower than the layer: on a 4096 x 4096
# layer (Zen 5, 1 thread, thread CPU time, 15 interleaved runs) blocks of 512 / 1024 / 2048 / all
# 4096 prepacked rows ran at 0.89 / 0.91-0.95 / 0.97 / 1.03-1.05x bf16 F.linear's speed at 256
# tokens (dequantization excluded); plain blocks of 512 rows through F.linear at 0.84-0.87x. So a
# block is as much of the layer as 32 MiB of bf16 holds (a 4096 x 4096 layer whole).
GEMM_BYTES = 32 << 20
# fp32 blocks of 256 / 512 / 1024 / 2048 / 4096 rows of a 4096 x 4096 layer ran within noise of each
# other at 64 and 384 tokens (torch.mm, Zen 5, 1 thread, loaded), so an fp32 block is small: 256
# rows there, a 16th of the layer.
FP32_GEMM_BYTES = 4 << 20
PLAIN, ONEDNN = 0, 1  # the dequantizers' layout argument (their sources describe both)
ONEDNN_ROWS, ONEDNN_INPUTS = 64, 32  # oneDNN's AB16b64a2b: 64 rows x 32 inputs per block
# The token count oneDNN is told to pack for; it chose the same layout for 1 to 2048 (oneDNN 3.12).
PACK_HINT = 256

# dequantize(lo, hi, address, layout): write rows lo..hi of the weight at address in that layout.
Dequantize = Callable[[int, int, int, int], None]
_local = threading.local()  # each thread's buffers, one per block shape and layout


def onednn_layout(w: torch.Tensor) -> torch.Tensor:
    """A [rows, k] weight's elements in the ``ONEDNN`` layout's order, flat."""
    rows, k = w.shape
    blocks = w.reshape(rows // ONEDNN_ROWS, ONEDNN_ROWS, k // ONEDNN_INPUTS, ONEDNN_INPUTS // 2, 2)
    return blocks.permute(0, 2, 3, 1, 4).reshape(-1)


@functools.cache
def onednn_packs(rows: int, k: int) -> bool:
    """Whether oneDNN holds a [rows, k] bf16 weight in the ``ONEDNN`` layout: checked once per shape
    against its own packing of a random weight, byte for byte."""
    w = torch.randn(rows, k, generator=torch.Generator().manual_seed(0)).bfloat16()
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(w, PACK_HINT)
        if torch.ops.mkldnn._nbytes(packed) != w.numel() * w.element_size():
            return False  # padded
        raw = torch.empty_like(w)
        ctypes.memmove(raw.data_ptr(), torch.ops.mkldnn.data_ptr(packed), raw.numel() * raw.element_size())
    except (AttributeError, RuntimeError):  # a torch without these oneDNN ops, or without oneDNN
        return False
    return torch.equal(raw.view(-1), onednn_layout(w))


def block_rows(n: int, k: int, onednn: bool = True, dtype: torch.dtype = torch.bfloat16) -> tuple[int, int]:
    """(rows per block, layout) for an [n, k] weight: in bf16 the ``ONEDNN`` layout in blocks of a
    multiple of 64 rows dividing n where oneDNN takes it (and ``onednn``), else ``PLAIN`` blocks of
    a multiple of 16 rows."""
    fp32 = dtype == torch.float32
    limit = max(ONEDNN_ROWS, FP32_GEMM_BYTES // (4 * k) if fp32 else GEMM_BYTES // (2 * k))
    if onednn and not fp32 and n % ONEDNN_ROWS == 0 and k % ONEDNN_INPUTS == 0:
        fits = [r for r in range(ONEDNN_ROWS, min(limit, n) + 1, ONEDNN_ROWS) if n % r == 0]
        if fits and onednn_packs(fits[-1], k):
            return fits[-1], ONEDNN
    return min(n, limit // 16 * 16), PLAIN


def _buffer(rows: int, k: int, layout: int, dtype: torch.dtype) -> torch.Tensor:
    buffers = _local.__dict__.setdefault("buffers", {})
    if (rows, k, layout, dtype) not in buffers:
        buf = torch.zeros(rows, k, dtype=dtype)
        buffers[rows, k, layout, dtype] = (
            buf if layout == PLAIN else torch.ops.mkldnn._reorder_linear_weight(buf, PACK_HINT)
        )
    return buffers[rows, k, layout, dtype]


def blocked_gemm(x: torch.Tensor, n: int, dequantize: Dequantize, onednn: bool = True) -> torch.Tensor:
    """[M, n] = x [M, K] @ W^T in x's dtype (bf16 or fp32), W's rows dequantized in that dtype a
    block at a time by ``dequantize``; lo and hi are multiples of 16 (of 64 in the ``ONEDNN``
    layout); ``onednn``: whether ``dequantize`` writes that layout (bf16 only)."""
    rows, layout = block_rows(n, x.shape[1], onednn, x.dtype)
    buf = _buffer(rows, x.shape[1], layout, x.dtype)
    if layout == ONEDNN:
        address = torch.ops.mkldnn.data_ptr(buf)

        def product(lo: int, hi: int) -> torch.Tensor:
            dequantize(lo, hi, address, ONEDNN)
            return torch.ops.mkldnn._linear_pointwise(x, buf, None, "none", [None], "")

    else:

        def product(lo: int, hi: int) -> torch.Tensor:
            dequantize(lo, hi, buf.data_ptr(), PLAIN)
            return F.linear(x, buf[: hi - lo])

    if rows == n:
        return product(0, n)
    y = torch.empty(x.shape[0], n, dtype=x.dtype)
    for lo in range(0, n, rows):
        hi = min(lo + rows, n)
        y[:, lo:hi] = product(lo, hi)
    return y
