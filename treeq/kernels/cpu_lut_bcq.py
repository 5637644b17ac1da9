"""LUT-GEMM for binary-coding quantized weights (:mod:`treeq.bcq`) on x86 CPUs, AVX512 or AVX2.

Per token and slice of 8 inputs the 256 signed sums are tabled once; each output then adds, per
bit-plane, one table entry per slice (the plane's byte is the index), scales the group's sum by the
plane's alpha and adds offset x the group's input sum (``cpu_lut_bcq.cpp`` explains the layout).
The weight is never expanded, so one token reads q bits per weight. All sums in fp32: the result
equals x @ W^T of :func:`treeq.bcq.dequantize`'s weight up to summation order.

From ``DENSE_FROM`` tokens on (3 and 4 planes; 2 planes' look-ups stay faster) the layer is an fp32
GEMM over that weight instead (:mod:`.blocked_gemm`), dequantized bit for bit (``treeq_bcq_dequantize``)
into a reused buffer of at most 4 MiB of rows: each block's product is torch's ``x @ W[rows].T``.

Built with the system's g++ on first use. ``$TREEQ_CPU_ISA=avx2`` (:mod:`.cpu_isa`) forces the
AVX2 path on an AVX512 CPU, so one machine tests both.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import native
from ..bcq import PLANES, SLICE, BCQWeight
from ..errors import TreeqError
from ..numerics import group_width
from . import cpu_isa
from .base import Kernel, matmul_2d
from .blocked_gemm import blocked_gemm

SOURCE = Path(__file__).with_suffix(".cpp")
FLAGS = ("-mavx2", "-mfma", "-fopenmp")  # the AVX512 path sets its own target attribute
LANES = 16  # outputs per block: out_features must be a multiple
# Per number of planes, the tokens from which the dense path runs instead of the look-ups (None:
# never). The look-ups cost the same per token at any M; the dense path one dequantization (15-20 ms
# for 4096 x 4096) plus an fp32 GEMM costing per token about what 3 planes' look-ups cost.
# bench/lut_gemm.py --dense, AMD EPYC Zen 5 (family 26), 1 thread, loaded (bench/results/lut_gemm.md):
# LUT time / dense time at 128 / 256 / 1024 tokens over 3-5 runs: 3 planes 0.61-0.91 / 0.83-1.07 /
# 0.96-1.13, 4 planes 0.85-1.03 / 0.99-1.17 / 1.17-1.32, 2 planes 0.42-0.59 from 128 to 1024.
# Read at each call.
DENSE_FROM = {2: None, 3: 256, 4: 256}


@functools.cache
def library() -> tuple[ctypes.CDLL | None, str | None]:
    p, i, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    functions = {
        "treeq_bcq_lut_matmul": [p, i, i, p, p, p, i, i, i, p, c_int, c_int],
        "treeq_bcq_dequantize": [p, p, p, i, i, i, i, i, i, p, c_int],
    }
    # treeq_bcq_isa: 0 (unsupported) where the CPU has neither AVX512F nor AVX2 with FMA, else its level
    return native.load(SOURCE, FLAGS, "treeq_bcq_isa", "this CPU lacks AVX2 and FMA", functions)


def unavailable() -> str | None:
    return library()[1]


def path(tokens: int = 1, planes: int = 3) -> str:
    """The path for ``tokens`` rows of a layer of ``planes`` bit-planes: "dense" from its DENSE_FROM
    tokens; else "avx512" where the CPU has AVX512F and ``$TREEQ_CPU_ISA`` allows AVX512, "avx2"
    otherwise."""
    dense_from = DENSE_FROM[planes]
    if dense_from is not None and tokens >= dense_from:
        return "dense"
    lib = library()[0]
    return "avx512" if lib is not None and lib.treeq_bcq_isa() == 2 and cpu_isa.allows("avx512_bf16") else "avx2"


def refuses(out_features: int, in_features: int, group_size: int) -> str | None:
    """Why the kernel cannot hold a layer of this shape; None when it can."""
    if out_features % LANES:
        return f"out_features={out_features} not a multiple of {LANES}"
    if group_size % SLICE or in_features % group_size:
        return f"group_size={group_size} not a multiple of {SLICE} dividing in_features={in_features}"
    return None


@dataclass
class LutState:
    planes: torch.Tensor  # uint8 [N/16, K/8, q, 16]
    alphas: torch.Tensor  # fp32 [N/16, groups, q, 16]
    offsets: torch.Tensor  # fp32 [N/16, groups, 16]
    out_features: int
    in_features: int
    group_size: int

    @property
    def q(self) -> int:
        return self.planes.shape[2]


def prepare(weight: BCQWeight) -> LutState:
    """The kernel's layout of ``weight``; a one-line TreeqError for shapes it cannot run."""
    n, k = weight.shape
    reason = refuses(n, k, weight.group_size)
    if reason is not None:
        raise TreeqError(f"cpu_lut_bcq: {reason}")
    q, groups = weight.planes.shape[0], k // weight.group_size
    planes = weight.planes.reshape(q, n // LANES, LANES, k // SLICE).permute(1, 3, 0, 2)
    alphas = weight.alphas.float().reshape(q, groups, n // LANES, LANES).permute(2, 1, 0, 3)
    offsets = weight.offsets.float().reshape(groups, n // LANES, LANES).permute(1, 0, 2)
    return LutState(planes.contiguous(), alphas.contiguous(), offsets.contiguous(), n, k, weight.group_size)


def dequantize_rows(st: LutState, lo: int, hi: int, address: int) -> None:
    """Output rows lo..hi (multiples of 16) of :func:`treeq.bcq.dequantize`'s fp32 weight, bit for
    bit, at ``address`` ([hi - lo, in_features], row-major)."""
    library()[0].treeq_bcq_dequantize(
        st.planes.data_ptr(), st.alphas.data_ptr(), st.offsets.data_ptr(), st.out_features, st.in_features,
        st.q, st.group_size, lo, hi, address, torch.get_num_threads(),
    )  # fmt: skip


def matmul(st: LutState, x: torch.Tensor) -> torch.Tensor:
    """fp32 [M, N] = x [M, K] (any float dtype, taken to fp32) times the BCQ weight transposed."""
    lib, why = library()
    if lib is None:
        raise TreeqError(f"cpu_lut_bcq: {why}")
    x = x.float().contiguous()
    if x.dim() != 2 or x.shape[1] != st.in_features:
        raise TreeqError(f"cpu_lut_bcq: input of shape {tuple(x.shape)}, expected [tokens, {st.in_features}]")
    chosen = path(x.shape[0], st.q)
    if chosen == "dense":

        def rows(lo, hi, address, _layout):  # always PLAIN (onednn=False)
            dequantize_rows(st, lo, hi, address)

        return blocked_gemm(x, st.out_features, rows, onednn=False)
    y = torch.empty(x.shape[0], st.out_features)
    lib.treeq_bcq_lut_matmul(
        x.data_ptr(), x.shape[0], st.in_features, st.planes.data_ptr(), st.alphas.data_ptr(),
        st.offsets.data_ptr(), st.out_features, st.q, st.group_size, y.data_ptr(),
        torch.get_num_threads(), int(chosen == "avx512"),
    )  # fmt: skip
    return y


class CpuLutBcq(Kernel):
    name = "cpu_lut_bcq"
    priority = 40  # the only kernel of BCQ layers beside the reference one
    bits = frozenset(PLANES)
    devices = frozenset({"cpu"})
    supports_desc_act = False
    extras = frozenset({"bcq"})

    @classmethod
    def rejects(cls, fmt, device, dtype):
        if fmt.extras != "bcq":
            return "runs BCQ layers (weight extras 'bcq') only"
        group = group_width(fmt.group_size, fmt.in_features)
        return super().rejects(fmt, device, dtype) or refuses(fmt.out_features, fmt.in_features, group) or unavailable()

    @classmethod
    def prepare(cls, layer) -> None:
        layer.kernel_state = prepare(layer.extras.weight(layer.codes(), layer.scales))

    @staticmethod
    def forward(layer, x: torch.Tensor) -> torch.Tensor:
        return matmul_2d(layer, x, torch.float32, lambda x2: matmul(layer.kernel_state, x2))


KERNEL = CpuLutBcq
