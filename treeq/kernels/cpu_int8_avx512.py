"""CPU 8-bit kernel for per-row groups on x86 with AVX512-BF16: ``cpu_int8``'s op for a few tokens,
and for longer prompts ``cpu_int4_avx512``'s panel paths on the op's own int8 rows.

``cpu_int8``'s long-prompt path dequantizes the whole weight into rows that oneDNN then repacks for
its bf16 GEMM, two passes over a bf16 copy of the weight per call, and stayed below bf16 at every
length (bench/results/kernels.md). Here each 64 outputs' weights are dequantized once per call
into bf16 panels, each weight the reference kernel's ((code - zero) * scale in fp32, rounded once),
which AMX tiles (where the CPU has them) or AVX512 dot products multiply with fp32 sums, as
``cpu_int4_avx512`` does for 4-bit weights; no second copy of the weight is kept. With AMX and up to
32 tokens the rows path takes the weights' rows as tiles as they are, and the few tokens' inputs
transposed instead, so no weight is transposed; up to 128 tokens the rows panel path does the same
on weights dequantized once per call. Without AMX the vector rows panel path is its counterpart, up
to 64 tokens where they fill their groups of 16 token rows. Before it, from 3 to 16 tokens (32 on
layers of 1024 outputs or more), the vector rows stream path dequantizes each weight into registers
where every token's inputs meet it, and stores no panel (beyond 14 tokens it runs passes of up to 8,
the first keeping its rows' weights for the others).
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import native
from . import cpu_int4_avx512, cpu_isa
from .base import matmul_2d
from .cpu_int8 import CpuInt8, _Int8State, gemm_matmul, op_matmul

# Token counts at which each path takes over (bench/kernel_speed.py; figures in bench/results/kernels.md).
# - The op runs below 3 tokens. Without AMX, from 3 to 16 tokens (to 32 on layers of
#   STREAM_WIDE_FROM outputs or more), the vector rows stream path. On a Zen 4 (2 threads, six
#   layer shapes from 192 x 576 to 5632 x 2048) the op fell to 0.73-1.0x bf16 at 5 tokens, where
#   the stream path ran 1.2-1.8x; from 6 to 14 tokens the stream path ran 1.0-2.0x where the panel
#   paths ran 0.89-1.67x. Once it added its sums' lanes 16 at a time (lane_totals; two paths on the
#   same weights, each order once, 1 and 2 threads) it ran 1.03-1.09x the op's speed at 3 tokens on
#   three layers (whole models 1.15x on SmolLM2, 1.03x on the random Llama) but 0.96-1.05x at 2;
#   beyond 16 tokens it ran 1.04-1.28x the panel path's speed at 17-28 tokens and 1.00-1.14x the
#   rows panel path's at 32 on layers of 1536 to 5632 outputs, and whole models followed (20-32
#   tokens with the stream path on every layer: SmolLM2 1.20-1.27x bf16 against 1.16-1.21x, the
#   random Llama 1.14-1.24x against 1.09-1.18x). On 192 to 576 outputs at 2 threads the panel path
#   stayed ahead beyond 16 tokens (the stream path 0.70-0.90x its speed on 192 x 576, 0.86-1.08x on
#   576 x 576 over two runs, 0.90-0.98x on 576 x 1536), hence STREAM_MAX there. From 40 tokens it
#   fell behind on SmolLM2's layers, and up to 64 on larger ones the random Llama did not follow
#   (bench/results/kernels.md). With AMX the rows path, once it read one block of rows at a time,
#   was ahead of the op from 3 tokens in whole models (random Llama at 4 tokens 1.23x bf16 against
#   the op's 1.00-1.02x); on SmolLM2's cached layers the op stayed ahead up to 4 tokens, by 5% at 4.
# - With AMX, up to 32 tokens the AMX rows path (the weights' rows as tiles, no transposition; at
#   8-32 tokens 1.22-1.93x bf16 where the AMX panel path ran 0.75-1.14x); up to 128 tokens the AMX
#   rows panel path (the same operands, each weight dequantized once per call into a panel: ahead
#   of the AMX panel path, whose transposing fill took a fifth of a 64-token call, on every layer
#   but 576 x 576 at two threads, where both ran above bf16; level or behind from 160), where one
#   panel holds all the inputs (cpu_int4_avx512.PANEL_INPUTS); then the AMX panel path, and from
#   cpu_int4_avx512.gemm_from the GEMM (on 2048 x 2048 at 2048 tokens on one thread it was
#   ahead of the panels; in whole models the same rule as for 4-bit weights held).
# - Without AMX (an AMX Xeon capped to AVX512-BF16, oneDNN too) the vector panel path. On a real
#   Zen 4 it also stayed ahead of the GEMM at 1024 and 2048 tokens in SmolLM2 (by 7% and 4%), so
#   unlike 4-bit weights, 8-bit ones do not go to the GEMM there. Up to 64 tokens, where they fill
#   their groups of 16 token rows but for at most 2, the vector rows panel path, which dequantizes
#   the weights without transposing them and transposes the inputs instead: level with the vector
#   panel path or ahead by up to 14% there on six layer shapes (the Zen 4, 2 threads). It computes whole groups,
#   so where the last holds a few tokens it fell behind by up to 17% (17, 33, 65 tokens); beyond
#   64 tokens it gained little (at 94 to 142 tokens level or behind).
# Read at each call, so tests can force each path.
STREAM_FROM = 3
STREAM_MAX = 16
STREAM_WIDE_MAX = 32  # on layers of STREAM_WIDE_FROM outputs or more
STREAM_WIDE_FROM = 1024
ROWS_PANEL_MAX = 64
ROWS_PANEL_PADDING_MAX = 2  # token rows of padding its last group of 16 may hold
AMX_FROM = 3
AMX_ROWS_MAX = 32  # the rows path's two input tiles hold 32 token rows
AMX_ROWS_PANEL_MAX = 128


def path(tokens: int, amx: bool, n: int, k: int) -> str:
    """The path a call with ``tokens`` rows takes for an [n, k] weight: "op", "panel", without AMX
    "rows_stream" or "rows_panel", with AMX "amx_rows", "amx_rows_panel" or "gemm"."""
    if tokens < (AMX_FROM if amx else STREAM_FROM):
        return "op"
    if not amx:
        if tokens <= (STREAM_WIDE_MAX if n >= STREAM_WIDE_FROM else STREAM_MAX):
            return "rows_stream"
        return "rows_panel" if tokens <= ROWS_PANEL_MAX and -tokens % 16 <= ROWS_PANEL_PADDING_MAX else "panel"
    if tokens <= AMX_ROWS_MAX:
        return "amx_rows"
    if tokens <= AMX_ROWS_PANEL_MAX and k <= cpu_int4_avx512.PANEL_INPUTS:
        return "amx_rows_panel"
    return "gemm" if tokens >= cpu_int4_avx512.gemm_from(n, k, amx) else "panel"


SOURCE = Path(__file__).with_suffix(".cpp")  # with the panel paths it shares with cpu_int4_avx512


def library() -> tuple[ctypes.CDLL | None, str | None]:
    return _built(cpu_int4_avx512.flags())


@functools.cache
def _built(build_flags: tuple[str, ...]) -> tuple[ctypes.CDLL | None, str | None]:
    p, i, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    functions = {"treeq_int8_matmul": [p, i, i, p, p, p, i, p, c_int, c_int]}
    return native.load(SOURCE, build_flags, "treeq_cpu_supported", "this CPU lacks AVX512-BF16", functions)


def unavailable() -> str | None:
    """Why the kernel cannot run here (read afresh at each selection, as cpu_int4_avx512's); None if it can."""
    return library()[1] or cpu_isa.forbidden("avx512_bf16")


@dataclass
class _State(_Int8State):
    amx: bool  # cpu_int4_avx512.amx_allowed() when the kernel was chosen


def native_matmul(st: _State, x2: torch.Tensor, path: str) -> torch.Tensor:
    """[M, out] = bf16 x2 [M, in] (contiguous, as matmul_2d hands it) times the reference kernel's
    bf16 weight, fp32 sums, in bf16, by the native ``path`` ("panel": AMX or vector by ``st.amx``;
    "rows_panel" and "rows_stream": vector; "amx_rows": M <= 32, and "amx_rows_panel": AMX only)."""
    n = st.weight.shape[0]
    y = torch.empty(x2.shape[0], n, dtype=torch.bfloat16)
    code = {"amx_rows": 2, "amx_rows_panel": 3, "rows_panel": 4, "rows_stream": 5}.get(path, int(st.amx))
    library()[0].treeq_int8_matmul(
        x2.data_ptr(), x2.shape[0], x2.shape[1], st.weight.data_ptr(), st.scale32.data_ptr(), st.zero.data_ptr(), n,
        y.data_ptr(), torch.get_num_threads(), code,
    )  # fmt: skip
    return y


class CpuInt8Avx512(CpuInt8):
    name = "cpu_int8_avx512"
    priority = 25  # above cpu_int8: its op for a few tokens, the panel paths beyond
    in_multiple = cpu_int4_avx512.TILE_K
    out_multiple = cpu_int4_avx512.TILE_N

    @classmethod
    def rejects(cls, fmt, device, dtype):
        return super().rejects(fmt, device, dtype) or unavailable()

    @classmethod
    def prepare(cls, layer) -> None:
        super().prepare(layer)
        base = layer.kernel_state
        layer.kernel_state = _State(**vars(base), amx=cpu_int4_avx512.amx_allowed())

    @staticmethod
    def forward(layer, x: torch.Tensor) -> torch.Tensor:
        st: _State = layer.kernel_state
        return matmul_2d(layer, x, torch.bfloat16, lambda x2: matmul(st, x2))


def matmul(st: _State, x2: torch.Tensor) -> torch.Tensor:
    chosen = path(x2.shape[0], st.amx, st.weight.shape[0], x2.shape[1])
    if chosen == "op":
        return op_matmul(st, x2)
    return gemm_matmul(st, x2) if chosen == "gemm" else native_matmul(st, x2, chosen)


KERNEL = CpuInt8Avx512
