"""Where the looper's activation memory comes from, and when it goes back.

The lockstep looper runs each calibration batch in its own thread, and every op of a layer forward
makes fresh activation-sized tensors. Two ways glibc serves them both cost:

* per-thread heaps: glibc gives each thread its own, and after the first large free raises its
  mmap threshold so later tensors of that size come from them; each heap keeps the pages its
  thread freed. On SmolLM2 (128 x 512 calibration) peak RSS went from 1.9 GB to 4.8 GB.
* one mapping per large tensor (a low mmap threshold; streaming's setting, below):
  memory goes back at every free, but every op page-faults its output afresh; transparent huge
  pages make that cheaper, not free (a bf16 product or silu output took 1.7-3x as long as reused).

So importing treeq puts every thread on one heap (:func:`one_heap`; the user's own
``MALLOC_ARENA_MAX`` wins), and the in-memory looper (:func:`reuse_freed_memory`) serves tensors
up to glibc's largest mmap threshold (32 MB) from it without trimming as it goes: a layer's batches
reuse each other's freed blocks. :func:`release_free_heap` hands the free pages back once per
subset (while every batch is paused) and once per layer, so freed blocks never pile up. Streaming
keeps one mapping per tensor (:func:`map_large_allocations`): memory is its budget. Tensors above
32 MB are mappings of their own; torch's allocator asks for transparent huge pages for them when
``THP_MEM_ALLOC_ENABLE`` is set, which it reads once, at its first allocation: importing treeq sets
it unless the user already has (or torch allocated first). Figures:
bench/results/quantize_smollm2.md.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

# From glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MMAP_THRESHOLD_MAX = 32 << 20  # the largest M_MMAP_THRESHOLD glibc accepts on 64-bit systems
# Freed memory at the heap's top is kept up to this much between release_free_heap calls.
TRIM_THRESHOLD = 1 << 30
LARGE = 1 << 20  # streaming's mmap threshold


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


def _mallopt(*settings: tuple[int, int]) -> bool:
    """Apply glibc malloc settings; False where the C library is not glibc or one is refused."""
    mallopt = _glibc_function("mallopt")
    # A list, not a generator: every setting is applied even after one is refused.
    return mallopt is not None and all([bool(mallopt(param, value)) for param, value in settings])


def one_heap() -> bool:
    """Every thread allocating from glibc's main heap from now on, unless the user set
    ``MALLOC_ARENA_MAX``; called when treeq is imported. Setting it only when the looper starts
    was too late: threads that had exited by then (a tokenizer's, an evaluation's) left their heaps
    on glibc's free list, the looper's new threads took those, and their freed activations were
    not shared (GPTQ through the CLI took a third longer)."""
    return "MALLOC_ARENA_MAX" not in os.environ and _mallopt((M_ARENA_MAX, 1))


def reuse_freed_memory() -> bool:
    """Tensors up to 32 MB from the heap, no trimming as it goes: for the in-memory looper, which
    hands free pages back itself (:func:`release_free_heap`)."""
    return _mallopt((M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX), (M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def map_large_allocations() -> bool:
    """Every tensor from 1 MB its own mapping, returned at its free: for streaming, where resident
    memory is the budget and page faults the accepted price."""
    return _mallopt((M_MMAP_THRESHOLD, LARGE))


def release_free_heap() -> None:
    """Hand the heap's free pages back to the system (small allocations, e.g. a tokenizer's, stay
    resident otherwise): after each layer, and in streaming, where resident memory is the budget."""
    trim = _glibc_function("malloc_trim")
    if trim is not None:
        trim(0)
