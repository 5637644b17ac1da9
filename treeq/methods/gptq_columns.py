"""GPTQ's column loop in one native call per run of columns (``gptq_columns.cpp``).

In torch each column took a dozen small ops over all rows (quantize, dequantize, the error, a
rank-one update of the block), and those calls, not their arithmetic, were GPTQ's column loop
(bench/results/quantize_smollm2.md). The native loop runs each row through the columns on its own
and repeats every fp32 operation of the torch loop in its order, so codes and errors are the same
bit for bit (tests/test_gptq_columns.py). Built on first use for x86 CPUs with AVX2 and FMA;
elsewhere (or without a compiler) :func:`sweep` answers False and GPTQ runs its torch loop.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from .. import native
from ..numerics import Grid

SOURCE = Path(__file__).with_suffix(".cpp")


@functools.cache
def library() -> tuple[ctypes.CDLL | None, str | None]:
    """(library, None) or (None, why this machine cannot run it)."""
    p, i, f = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    signature = [p, i, i, p, i, i, i, p, p, p, f, f, f, p, i, p, ctypes.c_int]
    return native.load(
        SOURCE, native.AVX2_EXACT, "treeq_gptq_columns_supported", "this CPU lacks AVX2 and FMA",
        {"treeq_gptq_columns": signature},
    )  # fmt: skip


def sweep(
    grid: Grid,
    w1: torch.Tensor,
    u1: torch.Tensor,
    begin: int,
    end: int,
    group: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    codes: torch.Tensor,
    err1: torch.Tensor,
) -> bool:
    """Columns ``begin`` .. ``end`` of the block ``w1`` [rows, width] (fp32, contiguous, updated in
    place): each quantized with the params of its ``group`` (int64 [width]) from ``scales`` /
    ``zeros`` [groups, rows], its codes into ``codes`` [rows, >= width] (uint8, the block's first
    column first), its error over the pivot into ``err1`` [rows, width], pushed onto the block's
    later columns through ``u1`` [width, width] (rows may be strided). False, and nothing done, where
    the native loop cannot run this (then run the torch loop)."""
    lib = library()[0]
    if lib is None or not grid.standard_rounding:
        return False
    fp32 = (w1, u1, scales, zeros, err1)
    if any(t.device.type != "cpu" for t in (*fp32, group, codes)) or any(t.dtype != torch.float32 for t in fp32):
        return False
    if not all(t.is_contiguous() for t in (w1, err1, scales, zeros)) or u1.stride(1) != 1 or codes.stride(1) != 1:
        return False
    if group.dtype != torch.int64 or codes.dtype != torch.uint8:
        return False
    group = group.contiguous()
    lib.treeq_gptq_columns(
        w1.data_ptr(), w1.shape[0], w1.shape[1], u1.data_ptr(), u1.stride(0), begin, end, group.data_ptr(),
        scales.data_ptr(), zeros.data_ptr(), grid.offset, grid.min_code, grid.maxq, codes.data_ptr(),
        codes.stride(0), err1.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return True
