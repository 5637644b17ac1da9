"""CPU 4-bit kernel of our own for x86 with AVX512-BF16, using AMX tiles when the CPU has them.

Weights stay 4-bit in memory and become bf16 only in registers, a per-thread buffer, or (long
prompts) one panel or block of rows per call; the source (``cpu_int4_avx512.cpp``) explains the
layout. How it compares with bf16 and with torch's fused op at each token count, with and without
AMX: bench/results/kernels.md.
Built with the system's g++ on first use; without a compiler or the instructions it declines and
``cpu_int4`` runs instead.

Paths, chosen per call by the number of tokens (:func:`path`): without AMX, AVX512 dot products
on codes streamed from memory ("vector") or, from a few tokens on, expanded once per block of
tokens ("expanded"), or from some dozens of tokens on, on each unit's weights dequantized once per
call ("panel"); with AMX, tiles on codes expanded per group ("amx") or, from some hundred tokens
on, on each unit's weights dequantized once per call ("amx_panel"), and for long prompts a bf16
GEMM over blocks of the weight dequantized exactly ("gemm", :mod:`.blocked_gemm`).
``$TREEQ_CPU_ISA`` (:mod:`.cpu_isa`) forbids AMX or AVX512-BF16 where the CPU has them, so one
machine tests the paths of older ones.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import native
from ..errors import TreeqError
from . import blocked_gemm, cpu_isa
from .base import Kernel, grouped_codes, matmul_2d

SOURCE = Path(__file__).with_suffix(".cpp")
FLAGS = ("-mavx512f", "-mavx512bw", "-mavx512bf16", "-mamx-tile", "-mamx-bf16", "-mfma", "-fopenmp")
# With AMX's tiles in software (cpu_isa.amx_emulated): no AMX instruction is emitted.
EMULATED_FLAGS = (*(f for f in FLAGS if not f.startswith("-mamx")), "-DTREEQ_AMX_EMULATED")


def flags() -> tuple[str, ...]:
    """The flags the AVX512-BF16 kernels are built with here and now."""
    return EMULATED_FLAGS if cpu_isa.amx_emulated() else FLAGS


TILE_N, TILE_K = 16, 32
UNIT_BLOCKS = 4  # blocks of 16 outputs whose tiles are interleaved (the .cpp's kMaxBlocks)
# Token counts from which the next path takes over (bench/kernel_speed.py; figures in
# bench/results/kernels.md). Without AMX the vector path streams the codes, expanding them once per
# four token rows; the expanded path expands them once per 96 rows into a buffer and keeps 24 sums
# in registers, as a GEMM library's inner kernel does. At 1 token the two were within noise of each
# other (either ahead, by layer shape, on a Zen 5); from 8 tokens the expanded path was ahead on
# every shape. The expanded path applies each group's scale and zero point to its sums, a step per
# group and 6 token rows; the vector panel path dequantizes each weight once per call, as the AMX
# panel path does, and keeps the sums in registers over all the inputs. With AVX512-BF16 and no AMX
# (an AMX Xeon capped, oneDNN too) the two crossed near as many tokens as a group has inputs (64 at
# groups of 64, 128 at 128), and from there to 2048 tokens the panel path was ahead of oneDNN's
# bf16 GEMM on every shape, alone and on the weight dequantized into its own layout. In whole
# models on a real Zen 4 (2 threads, prefill timed in turns) the GEMM on the dequantized weight was
# behind at 1024 tokens (1-3%) and level or ahead from 1536 (SmolLM2: +3.6% at 1536, +0.3-3.4% at
# 2048, +1.3% at 2560, -0.4% at 3072; the random Llama: +1.8% at 2048), so it takes over from 2048
# tokens there, for every weight size.
# With AMX the AMX path applies each group's scale to sums taken out of the tiles, a step per group
# whose cost grows with the tokens and the groups; the AMX panel path dequantizes each weight once
# per call and keeps the sums in the tiles. So the panel path takes over in proportion to the group
# size: on an AMX Xeon (576 x 576, 1536 x 576, 2048 x 2048, 4096 x 4096; 1 and 2 threads) the two
# crossed near 48, 96 and 192 tokens for groups of 32, 64 and 128, and with one group per row the
# AMX path was still level with the panel path at 256 tokens. The panel path was ahead of the GEMM
# up to 1024 tokens in total time over 1 and 2 threads. From there it depends on whether the
# weight's bf16 copy fits a core's L2: in whole models (2 threads) on SmolLM2's layers (at most
# 1.8 MB in bf16) the two were level at 2048 tokens and the GEMM ahead by 3-6% from 3072, while on
# the random Llama's (8-22 MB, which the GEMM path writes out and oneDNN reads back) the panel path
# stayed ahead: 7-10% at 2048-2560 tokens, level at 3072, 2-12% at 4096, level at 6144. So the GEMM
# takes over later for large weights with AMX (gemm_from). Module attributes, read at each call.
EXPANDED_FROM = 4
PANEL_FROM_PER_GROUP_INPUT = 1.0
AMX_PANEL_FROM_PER_GROUP_INPUT = 1.5
PANEL_FROM_MAX = 256  # one group per row: few steps per group, the panel paths take over late
GEMM_FROM = 2048
AMX_GEMM_FROM_LARGE = 6144  # with AMX, weights larger than blocked_gemm.AMX_L2_BYTES in bf16
PANEL_INPUTS = 4096  # inputs one panel holds (the .cpp's kPanelTiles * kTileK)
PATH_CODES = {"vector": 0, "expanded": 1, "amx": 2, "amx_panel": 3, "panel": 4}  # the .cpp's path argument


def library() -> tuple[ctypes.CDLL | None, str | None]:
    return _built(flags())


@functools.cache
def _built(build_flags: tuple[str, ...]) -> tuple[ctypes.CDLL | None, str | None]:
    p, i, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    functions = {
        "treeq_int4_matmul": [p, i, i, p, p, p, i, i, p, c_int, c_int],
        "treeq_int4_dequantize": [p, p, p, i, i, i, i, i, p, c_int, c_int],
    }
    return native.load(SOURCE, build_flags, "treeq_cpu_supported", "this CPU lacks AVX512-BF16", functions)


def unavailable() -> str | None:
    """Why the kernel cannot run here (read afresh at each selection: the cap may change); None if
    it can."""
    return library()[1] or cpu_isa.forbidden("avx512_bf16")


def _library() -> ctypes.CDLL:
    lib, why = library()
    if lib is None:
        raise TreeqError(f"cpu_int4_avx512: {why}")
    return lib


def amx_allowed() -> bool:
    """Whether the CPU has AMX and ``$TREEQ_CPU_ISA`` lets the kernel use it; read once when the
    kernel is chosen (per call it cost more than a small layer's decode step can spare)."""
    return cpu_isa.allows("amx") and bool(_library().treeq_amx_supported())


def panel_from(group_size: int, amx: bool) -> int:
    """Tokens from which a panel path (AMX or vector) takes over from the path that scales its sums
    per group, for groups of ``group_size`` inputs."""
    per_input = AMX_PANEL_FROM_PER_GROUP_INPUT if amx else PANEL_FROM_PER_GROUP_INPUT
    return min(int(per_input * group_size), PANEL_FROM_MAX)


def gemm_from(n: int, k: int, amx: bool) -> int:
    """Tokens from which an [n, k] weight goes to the GEMM rather than a panel path."""
    return AMX_GEMM_FROM_LARGE if amx and 2 * n * k > blocked_gemm.AMX_L2_BYTES else GEMM_FROM


def path(tokens: int, amx: bool, group_size: int, n: int, k: int) -> str:
    """The path a call with ``tokens`` rows takes for an [n, k] weight in groups of ``group_size``
    inputs: "vector", "expanded", "panel", "amx", "amx_panel" or "gemm"."""
    if tokens >= gemm_from(n, k, amx):
        return "gemm"
    if amx:
        return "amx_panel" if tokens >= panel_from(group_size, amx) else "amx"
    if tokens >= panel_from(group_size, amx):
        return "panel"
    return "expanded" if tokens >= EXPANDED_FROM else "vector"


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
    amx: bool  # amx_allowed() when the kernel was chosen
    n: int = field(init=False)  # outputs
    k: int = field(init=False)  # inputs
    # The kernel's arguments that stay the same from call to call, looked up once (a decoding step
    # on a small layer is a few tens of microseconds, each lookup a fraction of one).
    weight_args: tuple = field(init=False)

    def __post_init__(self):
        self.n = self.scales.shape[0] * TILE_N
        self.k = self.packed.numel() * 2 // self.n
        self.weight_args = (
            self.packed.data_ptr(),
            self.scales.data_ptr(),
            self.zeros.data_ptr(),
            self.n,
            self.group_size,
        )


def dequantize_rows(st: _State, lo: int, hi: int, address: int, layout: int) -> None:
    """Output rows lo..hi of the weight as bf16 at ``address`` in a :mod:`.blocked_gemm` layout,
    inputs in kernel order: (code - zero) * scale in fp32 rounded once, the reference kernel's bf16
    weight."""
    _library().treeq_int4_dequantize(
        st.packed.data_ptr(), st.scales.data_ptr(), st.zeros.data_ptr(), st.n, st.k, st.group_size, lo, hi,
        address, layout, torch.get_num_threads(),
    )  # fmt: skip


def matmul(st: _State, x: torch.Tensor) -> torch.Tensor:
    """[..., N] = bf16 x [..., K] times the packed weight (inputs already in kernel order), in bf16:
    fp32 sums rounded once (the kernel's own paths) or the bf16 GEMM's."""
    m = x.numel() // st.k
    chosen = path(m, st.amx, st.group_size, st.n, st.k)
    if chosen == "gemm":
        return blocked_gemm.blocked_gemm(x.reshape(m, st.k), st.n, functools.partial(dequantize_rows, st)).view(
            *x.shape[:-1], st.n
        )
    if not x.is_contiguous():
        x = x.contiguous()
    y = torch.empty(*x.shape[:-1], st.n, dtype=torch.bfloat16)
    _library().treeq_int4_matmul(
        x.data_ptr(), m, st.k, *st.weight_args, y.data_ptr(), torch.get_num_threads(), PATH_CODES[chosen]
    )
    return y


class CpuInt4Avx512(Kernel):
    name = "cpu_int4_avx512"
    priority = 30  # above cpu_int4: faster from 2 tokens on, and at 1 on large layers (bench/kernel_speed.py)
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
        return reason or unavailable()

    @classmethod
    def prepare(cls, layer) -> None:
        codes, perm, gs = grouped_codes(layer, cls.name)
        layer.kernel_state = _State(
            packed=pack_tiles(codes),
            scales=per_block(layer.scales, torch.float16),
            zeros=per_block(layer.zeros(), torch.uint8),
            group_size=gs,
            perm=perm,
            amx=amx_allowed(),
        )

    @staticmethod
    def forward(layer, x: torch.Tensor) -> torch.Tensor:
        st: _State = layer.kernel_state
        if x.dtype == torch.bfloat16 and st.perm is None and layer.bias is None:
            # A bf16 model's usual layer, without matmul_2d's steps: with them SmolLM2-135M decoded
            # 7-9% slower (AMX Xeon), behind torch's op, its small layers' calls being that short.
            return matmul(st, x)
        return matmul_2d(layer, x, torch.bfloat16, lambda x2: matmul(st, x2), st.perm)


KERNEL = CpuInt4Avx512
