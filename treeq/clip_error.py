"""The clip search's weight error for every candidate in one native pass (``clip_error.cpp``).

GPTQ's clip search (``Grid.params`` with ``clip_search``) scores 32 clip ratios per group by
sum |w - fake_quant(w)|^2.4. As a chain of torch ops, each a pass over the candidates' weights, it
was the largest of GPTQ's own phases (bench/results/quantize_smollm2.md). Here each candidate's
codes and dequantized weights are the same fp32 operations as ``Grid.quantize`` and
``Grid.dequantize``. Only the power (by polynomials, within 1.5e-6 relative; torch's ``pow`` is
within 3.4e-6) and the order of the sum differ, so the pick can differ from torch's only between
candidates whose errors agree to about 1e-6.

Built on first use for x86 CPUs with AVX2 and FMA; elsewhere (or without a compiler) :func:`errors`
answers None and the caller computes the same in torch.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from . import native

SOURCE = Path(__file__).with_suffix(".cpp")


@functools.cache
def library() -> tuple[ctypes.CDLL | None, str | None]:
    """(library, None) or (None, why this machine cannot run it)."""
    p, i, f = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    signature = [p, i, i, p, p, i, f, f, f, f, p, ctypes.c_int]
    return native.load(
        SOURCE, native.AVX2_EXACT, "treeq_clip_errors_supported", "this CPU lacks AVX2 and FMA",
        {"treeq_clip_errors": signature},
    )  # fmt: skip


def errors(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, offset: float, lo: int, hi: int, norm: float
) -> torch.Tensor | None:
    """err [candidates, rows]: per candidate and row of ``w`` [rows, cols] (fp32), the sum of
    |w - ((q - zero) + offset) * scale|^norm with q = clamp(round(w / scale - offset) + zero, lo, hi),
    ``scale``/``zero`` [candidates, rows] fp32; None where the native pass cannot run (then compute it
    in torch). ``norm`` >= 2."""
    lib = library()[0]
    if lib is None or w.device.type != "cpu" or norm < 2:
        return None
    w, scale, zero = (t.float().contiguous() for t in (w, scale, zero))
    err = torch.empty(scale.shape, dtype=torch.float32)
    lib.treeq_clip_errors(
        w.data_ptr(), w.shape[0], w.shape[1], scale.data_ptr(), zero.data_ptr(), scale.shape[0],
        offset, lo, hi, norm - 2, err.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return err
