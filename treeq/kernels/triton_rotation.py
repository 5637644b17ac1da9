"""Pairwise rotation of activations on GPU in Triton (the math: :mod:`treeq.runtime.rotation`).

Not a matmul kernel (it defines no ``KERNEL``): quantized linears with a rotation run it on their
input before the registry's matmul. One program owns a block of rows and one channel group; it
applies the group's ``krot`` layers in place in the output buffer, each layer a gather of the
(i, j) columns, the 2x2 turn, and a scatter back. Triton is imported lazily so treeq works without it.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def rotate_kernel(
        out_ptr,
        pairs_ptr,
        theta_ptr,
        rows,
        n,
        KROT: tl.constexpr,
        GROUP: tl.constexpr,
        BLOCK_ROWS: tl.constexpr,
    ):
        row_block, group = tl.program_id(0), tl.program_id(1)
        r = row_block * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        t = tl.arange(0, GROUP // 2)
        row_ok = (r < rows)[:, None]
        base = out_ptr + r[:, None] * n + group * GROUP
        for k in range(KROT):
            i = tl.load(pairs_ptr + k * n + group * GROUP + 2 * t).to(tl.int32)
            j = tl.load(pairs_ptr + k * n + group * GROUP + 2 * t + 1).to(tl.int32)
            angle = tl.load(theta_ptr + k * (n // 2) + group * (GROUP // 2) + t)
            c, s = tl.cos(angle)[None, :], tl.sin(angle)[None, :]
            a = tl.load(base + i[None, :], mask=row_ok).to(tl.float32)
            b = tl.load(base + j[None, :], mask=row_ok).to(tl.float32)
            # Every thread must see the previous layer's stores before this layer's loads.
            tl.debug_barrier()
            tl.store(base + i[None, :], (a * c + b * s).to(out_ptr.dtype.element_ty), mask=row_ok)
            tl.store(base + j[None, :], (b * c - a * s).to(out_ptr.dtype.element_ty), mask=row_ok)
            tl.debug_barrier()

    return rotate_kernel


def triton_rotate(
    x: torch.Tensor, pairs: torch.Tensor, theta: torch.Tensor, group_size: int, block_rows: int = 16
) -> torch.Tensor:
    """:func:`treeq.runtime.rotation.rotate` along the last dimension of ``x``, computed in fp32."""
    shape, n = x.shape, x.shape[-1]
    out = x.reshape(-1, n).contiguous().clone()
    rows = out.shape[0]
    grid = (_cdiv(rows, block_rows), n // group_size)
    _kernel()[grid](
        out,
        pairs.to(torch.int16).contiguous(),
        theta.float().contiguous(),
        rows,
        n,
        KROT=pairs.shape[0],
        GROUP=group_size,
        BLOCK_ROWS=block_rows,
    )
    return out.reshape(shape)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)
