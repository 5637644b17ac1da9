"""Long prompts through a bf16 (or fp32) GEMM over a quantized weight, dequantized a block of output
rows at a time into a reused buffer.

From some dozens of tokens on a GEMM library outruns the fused kernels (their cost grows with the
tokens while a GEMM's per-token cost falls), yet a resident bf16 copy of every weight would undo the
point of quantizing. The product is the bf16 GEMM the bf16 model runs, on the weight the reference
kernel dequantizes. BCQ's dense path (:mod:`.cpu_lut_bcq`) runs the same in fp32, in plain rows.

bf16 ``F.linear`` repacks its whole weight into oneDNN's blocked layout at every call (oneDNN's
"copy_B"). Where oneDNN holds weights in one of the layouts ``ONEDNN_BLOCK_ROWS`` names (it picks
by CPU: 64-row blocks without AMX, 32-row blocks with it), the dequantizers write that layout
straight into a prepacked oneDNN buffer, so the dequantization stands in for that repacking instead
of adding to it. Elsewhere (another oneDNN, a shape it pads) the block is written row by row and
goes through ``F.linear``.

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
# The dequantizers' layout argument: PLAIN (rows), else oneDNN's blocked layout with that many rows
# per block, AB16b64a2b or AB16b32a2b: per block of rows x 32 inputs, 16 pairs of inputs for each row
# (their sources describe it). oneDNN 3.12 packed weights in 64-row blocks on a Zen 5 and in 32-row
# blocks on an AMX Xeon, so both are written; each shape's is checked against oneDNN's own packing.
PLAIN = 0
ONEDNN_BLOCK_ROWS = (64, 32)
ONEDNN_INPUTS = 32
# A core's L2 on the AMX Xeons measured (family 6 model 167): bf16 weights up to this size stay there
# through a GEMM, which decides both the layout below and, in cpu_int4_avx512, when the GEMM takes over.
AMX_L2_BYTES = 2 << 20
# The largest block worth writing in each blocked layout. With AMX (32-row blocks) oneDNN's GEMM ran
# slower on a prepacked weight than on rows once the weight outgrew a core's L2 (AMX Xeon, 2 MB L2,
# 1 and 2 threads, 1024 and 2048 tokens: 0.83-0.96x the rows' speed on 2048 x 2048 and 4096 x 4096),
# while on 1536 x 576 and smaller the prepacked weight gained 2-12%; on rows oneDNN repacks the
# weight a panel at a time into a buffer that stays in cache. Without AMX (64-row blocks, Zen 5)
# the prepacked 4096 x 4096 weight was ahead (above), so there every block is written blocked.
ONEDNN_MAX_BYTES = {64: GEMM_BYTES, 32: AMX_L2_BYTES}
# The token count oneDNN is told to pack for; it chose the same layout for 1 to 2048 (oneDNN 3.12).
PACK_HINT = 256

# dequantize(lo, hi, address, layout): write rows lo..hi of the weight at address in that layout.
Dequantize = Callable[[int, int, int, int], None]
_local = threading.local()  # each thread's buffers, one per block shape and layout


def onednn_layout(w: torch.Tensor, block_rows: int) -> torch.Tensor:
    """A [rows, k] weight's elements in oneDNN's layout of ``block_rows``-row blocks, flat."""
    rows, k = w.shape
    blocks = w.reshape(rows // block_rows, block_rows, k // ONEDNN_INPUTS, ONEDNN_INPUTS // 2, 2)
    return blocks.permute(0, 2, 3, 1, 4).reshape(-1)


@functools.cache
def onednn_block_rows(rows: int, k: int) -> int:
    """The rows per block (of ``ONEDNN_BLOCK_ROWS``) of the layout oneDNN holds a [rows, k] bf16
    weight in, or 0 if none: checked once per shape against its own packing of a random weight, byte
    for byte."""
    w = torch.randn(rows, k, generator=torch.Generator().manual_seed(0)).bfloat16()
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(w, PACK_HINT)
        if torch.ops.mkldnn._nbytes(packed) != w.numel() * w.element_size():
            return 0  # padded
        raw = torch.empty_like(w)
        ctypes.memmove(raw.data_ptr(), torch.ops.mkldnn.data_ptr(packed), raw.numel() * raw.element_size())
    except (AttributeError, RuntimeError):  # a torch without these oneDNN ops, or without oneDNN
        return 0
    fits = (r for r in ONEDNN_BLOCK_ROWS if rows % r == 0 and torch.equal(raw.view(-1), onednn_layout(w, r)))
    return next(fits, 0)


def block_rows(n: int, k: int, onednn: bool = True, dtype: torch.dtype = torch.bfloat16) -> tuple[int, int]:
    """(rows per block, layout) for an [n, k] weight: in bf16 oneDNN's blocked layout, in blocks of
    a multiple of its rows per block dividing n, where oneDNN takes it (and ``onednn``), else
    ``PLAIN`` blocks of a multiple of 16 rows."""
    fp32 = dtype == torch.float32
    smallest = min(ONEDNN_BLOCK_ROWS)
    limit = max(max(ONEDNN_BLOCK_ROWS), FP32_GEMM_BYTES // (4 * k) if fp32 else GEMM_BYTES // (2 * k))
    if onednn and not fp32 and n % smallest == 0 and k % ONEDNN_INPUTS == 0:
        rows = max(r for r in range(smallest, min(limit, n) + 1, smallest) if n % r == 0)
        layout = onednn_block_rows(rows, k)
        if layout and 2 * rows * k <= ONEDNN_MAX_BYTES[layout]:
            return rows, layout
    return min(n, limit // 16 * 16), PLAIN


def _buffer(rows: int, k: int, layout: int, dtype: torch.dtype) -> torch.Tensor:
    buffers = _local.__dict__.setdefault("buffers", {})
    if (rows, k, layout, dtype) not in buffers:
        buf = torch.zeros(rows, k, dtype=dtype)
        buffers[rows, k, layout, dtype] = (
            buf if layout == PLAIN else torch.ops.mkldnn._reorder_linear_weight(buf, PACK_HINT)
        )
    return buffers[rows, k, layout, dtype]


def blocked_gemm(
    x: torch.Tensor, n: int, dequantize: Dequantize, onednn: bool = True, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """[M, n] = x [M, K] @ W^T (+ ``bias``, added within each block's product) in x's dtype (bf16 or
    fp32), W's rows dequantized in that dtype a block at a time by ``dequantize``; lo and hi are
    multiples of 16 (of the rows per block in oneDNN's layout); ``onednn``: whether ``dequantize``
    writes oneDNN's layouts (bf16 only)."""
    rows, layout = block_rows(n, x.shape[1], onednn, x.dtype)
    buf = _buffer(rows, x.shape[1], layout, x.dtype)

    def bias_of(lo: int, hi: int) -> torch.Tensor | None:
        return None if bias is None else bias[lo:hi]

    if layout != PLAIN:
        address = torch.ops.mkldnn.data_ptr(buf)

        def product(lo: int, hi: int) -> torch.Tensor:
            dequantize(lo, hi, address, layout)
            return torch.ops.mkldnn._linear_pointwise(x, buf, bias_of(lo, hi), "none", [None], "")

    else:

        def product(lo: int, hi: int) -> torch.Tensor:
            dequantize(lo, hi, buf.data_ptr(), PLAIN)
            return F.linear(x, buf[: hi - lo], bias_of(lo, hi))

    if rows == n:
        return product(0, n)
    y = torch.empty(x.shape[0], n, dtype=x.dtype)
    for lo in range(0, n, rows):
        hi = min(lo + rows, n)
        y[:, lo:hi] = product(lo, hi)
    return y
