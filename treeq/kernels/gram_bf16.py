"""x^T x of bf16 inputs accumulated in fp32 on CPUs with AVX512-BF16 (``gram_bf16.cpp``).

Input statistics use it where oneDNN's bf16 mode for fp32 matmuls is not applied (CPUs without
AMX): there the fp32 product of the rounded inputs is exact but runs at fp32 speed, and a bf16
GEMM rounds its output to bf16, which made Cholesky need 5x the damping. No ``KERNEL`` here: this
is not a quantized-linear kernel.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from .. import native

SOURCE = Path(__file__).with_suffix(".cpp")
FLAGS = ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-fopenmp")


@functools.cache
def library() -> tuple[ctypes.CDLL | None, str | None]:
    """(library, None) or (None, why this machine cannot run it)."""
    p, i, f = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    signature = [p, ctypes.c_int, i, i, p, f, f, ctypes.c_int]
    return native.load(
        SOURCE, FLAGS, "treeq_gram_supported", "this CPU lacks AVX512-BF16", {"treeq_gram_bf16": signature}
    )


def gram_update(h: torch.Tensor, x: torch.Tensor, beta: float, alpha: float) -> None:
    """``h = beta * h + alpha * r^T r`` in place, ``r`` = ``x`` [n, d] (bf16, or fp32 rounded to
    bf16 as ``x.bfloat16()`` rounds), ``h`` [d, d] fp32 symmetric; every entry an fp32 sum of exact
    products in token order, whatever the thread count."""
    lib, why = library()
    if lib is None:
        raise RuntimeError(f"gram_bf16: {why}")
    n, d = x.shape
    fp32 = x.dtype == torch.float32
    if not (fp32 or x.dtype == torch.bfloat16) or h.dtype != torch.float32 or h.shape != (d, d):
        raise ValueError(f"gram_bf16: needs bf16 or fp32 x [n, d] and fp32 h [d, d], got {x.dtype} {tuple(x.shape)}")
    if x.device.type != "cpu" or not h.is_contiguous():
        raise ValueError("gram_bf16: x and h must be on the CPU, h contiguous")
    x = x.contiguous()
    lib.treeq_gram_bf16(x.data_ptr(), fp32, n, d, h.data_ptr(), beta, alpha, torch.get_num_threads())
