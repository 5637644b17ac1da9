"""Portable native dequantization (``cpu_dequantize.cpp``) for the long-prompt GEMM of ``cpu_int4``
and ``cpu_int8`` (rows of the reference kernel's bf16 weight) and for ``cpu_int4_fp32``'s and
``cpu_int8_fp32``'s (its fp32 weight), built on first use for any x86 CPU. Without a compiler the
first two keep their fused op at every token count and fp32 models the reference kernel."""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

from .. import native
from ..errors import TreeqError

SOURCE = Path(__file__).with_suffix(".cpp")


@functools.cache
def library() -> tuple[ctypes.CDLL | None, str | None]:
    lib, why = native.build(SOURCE, ("-fopenmp",))
    if lib is not None:
        p, i, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        lib.treeq_gptq4_dequantize.argtypes = [p, p, p, p, i, i, i, i, p, c_int, c_int]
        lib.treeq_gptq_dequantize_fp32.argtypes = [p, p, p, p, i, i, i, i, p, c_int, c_int]
        lib.treeq_int8_dequantize.argtypes = [p, p, p, i, i, i, p, c_int]
        for f in (lib.treeq_gptq4_dequantize, lib.treeq_gptq_dequantize_fp32, lib.treeq_int8_dequantize):
            f.restype = None
    return lib, why


def available() -> bool:
    return library()[0] is not None


def unavailable() -> str | None:
    """Why the kernels built on the dequantizer cannot run here; None when they can."""
    lib, why = library()
    return None if lib is not None else f"no native dequantizer: {why}"


def functions(kernel: str) -> ctypes.CDLL:
    """The library, or a one-line error naming ``kernel`` and why it could not be built."""
    lib, why = library()
    if lib is None:
        raise TreeqError(f"{kernel}: {why}")
    return lib
