"""W8A8 on the CPU: int8 activation codes times int8 weights, summed in int32 (AVX512-VNNI).

Weights are int8 per output row with a symmetric scale; activations are quantized per token at
run time (:func:`treeq.numerics.quantize_activation`). The C++ source (``w8a8_vnni.cpp``) is
built with the system's g++ on first use and shares torch's OpenMP threads; it explains the
layout and why the weight, not the activation, is the unsigned operand of ``vpdpbusd``. Where it
cannot run (no compiler; no AVX512-VNNI and AVX512-BF16; ``$TREEQ_CPU_ISA`` below
``avx512_bf16``) :func:`available` says why, and :func:`int8_linear_reference`, plain torch,
gives the same int32 sums and the same outputs bit for bit. No AMX-INT8 path: untested here.

Contracts (M tokens, K inputs, N outputs; tensors on the CPU):

- ``available() -> str | None``: why the kernel cannot run here (read afresh each call, as the
  cap may change), None when it can.
- ``quantize_per_token(x, bits=8) -> (codes, scale)``: x [M, K] bf16 or fp32 (fp16 is widened)
  -> int8 codes [M, K] in [-qmax, qmax], qmax = 2^(bits-1) - 1, and fp32 scale [M]; bit for bit
  ``numerics.quantize_activation(x, bits)`` (which it runs where the kernel cannot), bits 2..8.
- ``pack_weight(w_int8) -> PackedWeight``: int8 [N, K] -> the kernel's layout (needs the kernel).
- ``int8_linear(x_codes, x_scale, packed, w_scale, bias=None, out_dtype=torch.bfloat16)``:
  acc = x_codes @ w_int8^T exactly in int32, then y = ((fp32(acc) * x_scale[m]) * w_scale[n]) +
  bias[n] in fp32, each operation rounded once, rounded to bf16 last if out_dtype is bf16.
  x_scale [M], w_scale [N], bias [N] any float dtype (used in fp32). out_dtype torch.int32
  returns acc itself. K <= 65536 (the int32 sums' bound).
- ``int8_linear_reference(...)``: the same with the plain int8 weight [N, K] in place of
  ``packed``; identical results.
- ``int8_linear_outliers(x, outliers, w_outliers, weight, w_scale, ...)``: LLM.int8(): the int8
  GEMM over the inputs not in ``outliers`` plus the outlier inputs times their full-precision
  weight columns.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import native, numerics
from ..errors import TreeqError
from . import cpu_isa

SOURCE = Path(__file__).with_suffix(".cpp")
FLAGS = ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mavx512bf16", "-ffp-contract=off", "-fopenmp")
LANES = 16  # output rows per weight block (the .cpp's kLanes)
MAX_K = 65536  # K * 128 * 255 < 2^31: the .cpp's int32 sums cannot overflow
OUT_KINDS = {torch.int32: 0, torch.float32: 1, torch.bfloat16: 2}  # the .cpp's kind argument
# A CPU with AVX512-BF16 has VNNI too (the converse fails: Ice Lake), and the bf16 output uses it,
# so the kernel sits at the cap's avx512_bf16 level.
ISA_LEVEL = "avx512_bf16"


@functools.cache
def library() -> tuple[ctypes.CDLL | None, str | None]:
    p, i, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    functions = {
        "treeq_w8a8_quantize": [p, c_int, i, i, c_int, p, p, c_int],
        "treeq_w8a8_gemm": [p, i, i, p, i, p, p, p, p, c_int, c_int],
    }
    return native.load(SOURCE, FLAGS, "treeq_w8a8_supported", "this CPU lacks AVX512-VNNI or AVX512-BF16", functions)


def available() -> str | None:
    if not cpu_isa.allows(ISA_LEVEL):
        return f"AVX512-VNNI (level {ISA_LEVEL}) forbidden by {cpu_isa.ENV}={cpu_isa.cap()}"
    return library()[1]


def _library() -> ctypes.CDLL:
    why = available()
    if why is not None:
        raise TreeqError(f"w8a8_vnni: {why}")
    return library()[0]


def quantize_per_token(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    if x.dim() != 2:
        raise TreeqError(f"w8a8_vnni: activations must be [tokens, inputs], got {tuple(x.shape)}")
    if available() is not None:
        codes, scale, _ = numerics.quantize_activation(x, bits)
        return codes, scale
    if bits not in numerics.ACTIVATION_BITS:
        raise ValueError(f"activation bits={bits} not in {numerics.ACTIVATION_BITS}")
    x = (x if x.dtype in (torch.bfloat16, torch.float32) else x.float()).contiguous()
    m, k = x.shape
    codes, scale = torch.empty(m, k, dtype=torch.int8), torch.empty(m)
    _library().treeq_w8a8_quantize(
        x.data_ptr(), x.dtype == torch.bfloat16, m, k, 2 ** (bits - 1) - 1, codes.data_ptr(), scale.data_ptr(),
        torch.get_num_threads(),
    )  # fmt: skip
    return codes, scale


@dataclass(frozen=True)
class PackedWeight:
    data: torch.Tensor  # uint8 [N/16 rounded up, K/4 rounded up, 16, 4]: w + 128, padding 0
    n: int
    k: int

    @property
    def k_padded(self) -> int:
        return self.data.shape[1] * 4


def pack_weight(w_int8: torch.Tensor) -> PackedWeight:
    if w_int8.dtype != torch.int8 or w_int8.dim() != 2:
        raise TreeqError(f"w8a8_vnni: the weight must be int8 [out, in], got {w_int8.dtype} {tuple(w_int8.shape)}")
    n, k = w_int8.shape
    if k > MAX_K:
        raise TreeqError(f"w8a8_vnni: in_features={k} above {MAX_K}, where int32 sums could overflow")
    _library()
    stored = (w_int8.to(torch.int16) + 128).to(torch.uint8)
    stored = F.pad(stored, (0, -k % 4, 0, -n % LANES))  # stored 0: a zero product whatever the code
    blocks = stored.view(stored.shape[0] // LANES, LANES, stored.shape[1] // 4, 4)
    return PackedWeight(blocks.permute(0, 2, 1, 3).contiguous(), n, k)


def _check(x_codes: torch.Tensor, k: int, out_dtype: torch.dtype) -> None:
    if x_codes.dtype != torch.int8 or x_codes.dim() != 2 or x_codes.shape[1] != k:
        raise TreeqError(f"w8a8_vnni: codes must be int8 [tokens, {k}], got {x_codes.dtype} {tuple(x_codes.shape)}")
    if out_dtype not in OUT_KINDS:
        raise TreeqError(f"w8a8_vnni: out_dtype {out_dtype} not one of {list(OUT_KINDS)}")


def int8_linear(
    x_codes: torch.Tensor,
    x_scale: torch.Tensor,
    packed: PackedWeight,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    _check(x_codes, packed.k, out_dtype)
    lib = _library()
    x_codes = F.pad(x_codes, (0, packed.k_padded - packed.k)).contiguous()
    xs, ws = x_scale.float().contiguous(), w_scale.float().contiguous()
    b = None if bias is None else bias.float().contiguous()
    y = torch.empty(x_codes.shape[0], packed.n, dtype=out_dtype)
    lib.treeq_w8a8_gemm(
        x_codes.data_ptr(), x_codes.shape[0], packed.k_padded, packed.data.data_ptr(), packed.n, xs.data_ptr(),
        ws.data_ptr(), None if b is None else b.data_ptr(), y.data_ptr(), OUT_KINDS[out_dtype],
        torch.get_num_threads(),
    )  # fmt: skip
    return y


def int8_linear_reference(
    x_codes: torch.Tensor,
    x_scale: torch.Tensor,
    w_int8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    _check(x_codes, w_int8.shape[1], out_dtype)
    # fp64 holds every partial sum exactly (products below 2^14, sums far below 2^53), in any order;
    # fp32 would round sums above 2^24, which K * 127 * 127 passes from K = 1041.
    acc = (x_codes.double() @ w_int8.double().T).to(torch.int32)
    if out_dtype == torch.int32:
        return acc
    y = acc.float() * x_scale.float()[:, None] * w_scale.float()[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def int8_linear_outliers(
    x: torch.Tensor,
    outliers: torch.Tensor,
    w_outliers: torch.Tensor,
    weight,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    bits: int = 8,
    linear=int8_linear,
) -> torch.Tensor:
    """y = int8 GEMM of x with its outlier columns zeroed + x[:, outliers] @ w_outliers^T.

    x [M, K] bf16 or fp32; outliers: sorted int64 indices of input columns; w_outliers [N, len]:
    the weight's outlier columns in full precision. ``weight`` is what ``linear`` takes
    (:func:`pack_weight`'s result for :func:`int8_linear`, the int8 weight [N, K] for
    :func:`int8_linear_reference`); its outlier columns meet zero codes, so they may hold anything,
    but the per-row ``w_scale`` should come from the other columns (the point of the split). The
    outlier product is computed in fp32 and added to the GEMM's fp32 output, rounded once to
    ``out_dtype`` (x's dtype by default)."""
    inliers = x.index_fill(1, outliers, 0)
    codes, scale = quantize_per_token(inliers, bits)
    y = linear(codes, scale, weight, w_scale, bias, torch.float32)
    y += x.index_select(1, outliers).float() @ w_outliers.float().T
    return y.to(out_dtype or x.dtype)
