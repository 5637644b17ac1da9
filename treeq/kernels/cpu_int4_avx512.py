"""CPU 4-bit kernel of our own for x86 with AVX512-BF16, using AMX tiles when the CPU has them.

Weights stay 4-bit in memory and become bf16 only in registers or a per-thread tile buffer; the
source (``cpu_int4_avx512.cpp``) explains the layout. Through AMX it stays 2.7-3.7x ahead of bf16 up
to 16 tokens on a 4096-wide layer (bench/results/kernels.md), where torch's fused op falls behind
bf16 from 8 tokens on; at one token on small (576-wide) layers the op is still slightly faster.
Built with the system's g++ on first use; without a compiler or the instructions it declines and
``cpu_int4`` runs instead.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import TreeqError
from . import _native
from .base import Kernel, grouped_codes, matmul_2d

SOURCE = Path(__file__).with_suffix(".cpp")
FLAGS = ("-mavx512f", "-mavx512bw", "-mavx512bf16", "-mamx-tile", "-mamx-bf16", "-mfma", "-fopenmp")
TILE_N, TILE_K = 16, 32
UNIT_BLOCKS = 4  # blocks of 16 outputs whose tiles are interleaved (the .cpp's kMaxBlocks)
# The AMX path wins from one token on where it exists; the vector path serves CPUs without AMX.
AMX_FROM = 1


@functools.cache
def library() -> tuple[ctypes.CDLL | None, str | None]:
    lib, why = _native.build(SOURCE, FLAGS)
    if lib is None:
        return None, why
    if not lib.treeq_cpu_supported():
        return None, "this CPU lacks AVX512-BF16"
    p, i = ctypes.c_void_p, ctypes.c_int64
    lib.treeq_int4_matmul.argtypes = [p, i, i, p, p, p, i, i, p, ctypes.c_int, i]
    lib.treeq_int4_matmul.restype = None
    return lib, None


def pack_tiles(codes: torch.Tensor) -> torch.Tensor:
    """[N, K] codes 0..15 -> uint8 [N*K/2]: per 16x32 block the 16 tile rows (inputs 2p, 2p+1 for
    each of 16 outputs), rows 2t and 2t+1 in the low and high nibbles of the same bytes; blocks in
    units of four, their tiles interleaved tile by tile."""
    n, k = codes.shape
    t = codes.to(torch.uint8).view(n // TILE_N, TILE_N, k // TILE_K, TILE_K // 2, 2)
    t = t.permute(0, 2, 3, 1, 4).reshape(n // TILE_N, k // TILE_K, TILE_K // 4, 2, 2 * TILE_N)
    blocks = (t[:, :, :, 0] | (t[:, :, :, 1] << 4)).reshape(n // TILE_N, k // TILE_K, -1)
    units = blocks.split(UNIT_BLOCKS)  # [blocks, tiles, 256] each
    return torch.cat([u.transpose(0, 1).reshape(-1) for u in units])


def per_block(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[groups, N] -> [N/16, groups, 16] in ``dtype``: each block's 16 lanes contiguous per group."""
    g, n = values.shape
    return values.to(dtype).view(g, n // TILE_N, TILE_N).permute(1, 0, 2).contiguous()


@dataclass
class _State:
    packed: torch.Tensor
    scales: torch.Tensor  # fp16, exactly the checkpoint's
    zeros: torch.Tensor  # uint8
    group_size: int
    perm: torch.Tensor | None


def matmul(st: _State, x: torch.Tensor, amx_from: int | None = None) -> torch.Tensor:
    """fp32 [M, N] = bf16 x [M, K] times the packed weight (inputs already in kernel order)."""
    lib, why = library()
    if lib is None:
        raise TreeqError(f"cpu_int4_avx512: {why}")
    x = x.contiguous()
    m, k = x.shape
    n = st.scales.shape[0] * TILE_N
    y = torch.empty(m, n)
    lib.treeq_int4_matmul(
        x.data_ptr(), m, k, st.packed.data_ptr(), st.scales.data_ptr(), st.zeros.data_ptr(),
        n, st.group_size, y.data_ptr(), torch.get_num_threads(), AMX_FROM if amx_from is None else amx_from,
    )  # fmt: skip
    return y


class CpuInt4Avx512(Kernel):
    name = "cpu_int4_avx512"
    priority = 30  # above cpu_int4: faster from 2 tokens on, and at 1 on large layers (bench/kernels.py)
    bits = frozenset({4})
    devices = frozenset({"cpu"})
    dtypes = frozenset({torch.bfloat16, torch.float16})
    in_multiple = TILE_K
    out_multiple = TILE_N

    @classmethod
    def rejects(cls, fmt, device, dtype):
        reason = super().rejects(fmt, device, dtype)
        if reason is None and fmt.group_size != -1 and fmt.group_size % TILE_K:
            reason = f"group_size={fmt.group_size} not a multiple of {TILE_K}"
        return reason or library()[1]

    @classmethod
    def prepare(cls, layer) -> None:
        codes, perm, gs = grouped_codes(layer, cls.name)
        layer.kernel_state = _State(
            packed=pack_tiles(codes),
            scales=per_block(layer.scales, torch.float16),
            zeros=per_block(layer.zeros(), torch.uint8),
            group_size=gs,
            perm=perm,
        )

    @staticmethod
    def forward(layer, x: torch.Tensor) -> torch.Tensor:
        st: _State = layer.kernel_state
        return matmul_2d(layer, x, torch.bfloat16, lambda x2: matmul(st, x2), st.perm)


KERNEL = CpuInt4Avx512
