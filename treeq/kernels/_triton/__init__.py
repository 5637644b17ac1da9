"""Triton sources of the kernels in ``treeq.kernels``, imported on first use only.

Two reasons keep them out of the kernel files that discovery imports: triton is an optional
dependency, and ``triton.jit`` decides at decoration time whether a function is compiled or run by
the interpreter (``TRITON_INTERPRET=1``), so decorating at ``import treeq`` would fix that choice
before a test or user could set it.
"""
