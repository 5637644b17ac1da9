"""Keep freed activation memory from piling up in glibc's per-thread heaps.

The lockstep looper runs each calibration batch in its own thread. glibc gives threads their own
heaps and, after the first large free, raises its mmap threshold so later tensors of that size come
from those heaps, which keep freed pages. On SmolLM2 (128 x 512 calibration) that took peak RSS
from 1.9 GB to 4.8 GB. A fixed threshold makes every large tensor its own mapping, returned to the
system when freed.

Each such mapping is then page-faulted afresh at every op, 4 KB at a time: on a Zen 5 without AMX
that was 38 s of SmolLM2's GPTQ layer forwards. torch's allocator asks for transparent huge pages
for its large tensors when ``THP_MEM_ALLOC_ENABLE`` is set, which it reads once, at its first
allocation: importing treeq sets it unless the user already has (or torch was imported first).
Figures: bench/results/quantize_smollm2.md.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

M_MMAP_THRESHOLD = -3  # from glibc's malloc.h
LARGE = 1 << 20


def request_huge_pages() -> None:
    """Large tensors on 2 MB pages where the kernel allows them (transparent huge pages in
    ``always`` or ``madvise`` mode); a no-op elsewhere."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


@functools.cache
def _glibc_function(name: str):
    """A glibc function, or None where the C library is not glibc."""
    lib = ctypes.util.find_library("c")
    if lib is None:
        return None
    try:
        return getattr(ctypes.CDLL(lib), name)
    except (OSError, AttributeError):
        return None


@functools.cache
def map_large_allocations() -> bool:
    """Idempotent; False where the C library is not glibc (the setting then does not exist)."""
    mallopt = _glibc_function("mallopt")
    return mallopt is not None and bool(mallopt(M_MMAP_THRESHOLD, LARGE))


def release_free_heap() -> None:
    """Hand the heap's free pages back to the system (small allocations, e.g. a tokenizer's, stay
    resident otherwise); for streaming, where resident memory is the budget."""
    trim = _glibc_function("malloc_trim")
    if trim is not None:
        trim(0)
