"""Binary-coding quantization (BCQ, the weight format LUT-GEMM runs): the one home of its numerics.

A group of ``group_size`` weights of one output row is ``offset + sum_i alpha_i * b_i`` with
``b_i`` in {-1, +1} per weight and per bit-plane i < q, the alphas and the offset per (row, group).
The method (:mod:`treeq.methods.bcq`), the checkpoint format, the LUT kernel and the tests all
dequantize through :func:`dequantize`, so they agree bit for bit.

Storage, and why:

* bit-planes as uint8 [q, out, in / 8], bit j of byte k holding input 8k + j (1 means +1): a byte
  is exactly the index the LUT kernel looks up in the table of one 8-input slice;
* alphas fp16 [q, groups, out], as LUT-GEMM stores them;
* offsets fp32 [groups, out]: a uniform grid's offset, scale * ((2^q - 1) / 2 - zero), needs up to
  q more mantissa bits than fp16 holds, and the conversion from a uniform grid must be exact.

Dequantization is ``offset + alpha_0 b_0 + alpha_1 b_1 + ...`` in fp32, in that order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import TreeqError
from .numerics import ROW_CHUNK, SCALE_DTYPE, UniformGrid

PLANES = (2, 3, 4)
SLICE = 8  # inputs per packed byte, and per LUT table of 256 signed sums
_BIT = torch.tensor([1 << j for j in range(SLICE)], dtype=torch.uint8)
_BYTE_BITS = ((torch.arange(256)[:, None] >> torch.arange(SLICE)) & 1).to(torch.uint8)  # a byte's 8 bits


@dataclass
class BCQWeight:
    planes: torch.Tensor  # uint8 [q, out, in / 8]
    alphas: torch.Tensor  # fp16 [q, groups, out]
    offsets: torch.Tensor  # fp32 [groups, out]; zeros without an offset
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.planes.shape[1], self.planes.shape[2] * SLICE

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.planes, self.alphas, self.offsets, self.group_size)


def take_rows(base: BCQWeight, other: BCQWeight, rows: torch.Tensor) -> BCQWeight:
    """``base`` with the output rows where ``rows`` (bool [out]) is True taken from ``other``."""
    return BCQWeight(
        planes=torch.where(rows[None, :, None], other.planes, base.planes),
        alphas=torch.where(rows[None, None, :], other.alphas, base.alphas),
        offsets=torch.where(rows[None, :], other.offsets, base.offsets),
        group_size=base.group_size,
    )


def check_shape(in_features: int, group_size: int, planes: int) -> None:
    """Raise, in one line naming the fix, when BCQ cannot hold a layer of this shape."""
    if planes not in PLANES:
        raise TreeqError(f"BCQ planes={planes} not in {PLANES}")
    if group_size % SLICE or in_features % group_size:
        raise TreeqError(
            f"BCQ group_size={group_size} must be a multiple of {SLICE} dividing in_features={in_features}"
        )


def pack_planes(signs: torch.Tensor) -> torch.Tensor:
    """bool [q, out, in] (True: +1) -> uint8 [q, out, in / 8], bit j of byte k = input 8k + j."""
    q, out, n_in = signs.shape
    bits = signs.reshape(q, out, n_in // SLICE, SLICE).to(torch.uint8) * _BIT.to(signs.device)
    return bits.sum(dim=-1, dtype=torch.uint8)


def unpack_planes(planes: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_planes`."""
    q, out, n_bytes = planes.shape
    return (planes[..., None] & _BIT.to(planes.device)).ne(0).reshape(q, out, n_bytes * SLICE)


def codes_from_planes(planes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [out, in] with bit i the sign of plane i (1: +1): the bit-planes in GPTQ's code
    layout, which checkpoints pack as q-bit codes (:mod:`treeq.extras.bcq`)."""
    q, out, n_bytes = planes.shape
    bits = _BYTE_BITS.to(planes.device)[planes.long()]  # [q, out, bytes, 8]
    codes = bits[0].clone()
    for i in range(1, q):
        codes |= bits[i] << i
    return codes.reshape(out, n_bytes * SLICE)


def _patterns(planes: int, device) -> torch.Tensor:
    """bool [2^q, q]: the signs of each code (bit i: plane i)."""
    return ((torch.arange(2**planes, device=device)[:, None] >> torch.arange(planes, device=device)) & 1).bool()


def planes_from_codes(codes: torch.Tensor, planes: int) -> torch.Tensor:
    """Inverse of :func:`codes_from_planes`."""
    shifts = torch.arange(planes, device=codes.device)[:, None, None]
    return pack_planes(((codes.long()[None] >> shifts) & 1).bool())


def _signed(signs: torch.Tensor) -> torch.Tensor:
    return signs.float() * 2 - 1


def combine(offsets: torch.Tensor, alphas: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """offset + sum_i alpha_i * b_i in fp32, planes in order; ``alphas``/``signs`` stacked on dim 0,
    each broadcasting against ``offsets``. alpha * (+-1) is +-alpha exactly, so the sign is a select."""
    w = offsets.float()
    for a, s in zip(alphas, signs):
        a = a.float()
        w = w + torch.where(s, a, -a)
    return w


def dequantize(planes: torch.Tensor, alphas: torch.Tensor, offsets: torch.Tensor, group_size: int) -> torch.Tensor:
    """The fp32 weight [out, in], ROW_CHUNK output rows at a time: each (row, group)'s 2^q levels
    by :func:`combine`, then each weight's level by its code (the same fp32 sums, 1.6x faster than
    combining per weight)."""
    q, out, n_in = planes.shape[0], planes.shape[1], planes.shape[2] * SLICE
    groups = n_in // group_size
    patterns = _patterns(q, planes.device).T[:, None, None, :]  # [q, 1, 1, 2^q]
    w = torch.empty(out, n_in, dtype=torch.float32, device=planes.device)
    for lo in range(0, out, ROW_CHUNK):
        hi = min(lo + ROW_CHUNK, out)
        a = alphas[:, :, lo:hi].transpose(1, 2)[..., None]  # [q, rows, groups, 1]
        levels = combine(offsets[:, lo:hi].T[..., None], a, patterns)  # [rows, groups, 2^q]
        codes = codes_from_planes(planes[:, lo:hi]).long().view(hi - lo, groups, group_size)
        w[lo:hi] = levels.gather(2, codes).view(hi - lo, n_in)
    return w


# ---- fitting: rows are (output row, group) pairs, columns the group's weights ----


def _stored(alphas: torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The values a checkpoint holds, back in fp32: alphas through fp16, offsets fp32."""
    return alphas.to(SCALE_DTYPE).float(), offsets.float()


def nearest_signs(w: torch.Tensor, alphas: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """For each weight of ``w`` [rows, cols] the signs [q, rows, cols] whose level (offset + sum of
    signed alphas, per row: ``alphas`` [q, rows], ``offsets`` [rows]) is nearest: the optimal bits
    for fixed alphas. Ties go to the lower level."""
    q = alphas.shape[0]
    patterns = _patterns(q, w.device)
    levels = combine(offsets[:, None], alphas[:, :, None], patterns.T[:, None, :])  # [rows, 2^q]
    ordered, order = levels.sort(dim=1)
    pos = torch.searchsorted(ordered, w.float().contiguous()).clamp(1, 2**q - 1)
    lo, hi = ordered.gather(1, pos - 1), ordered.gather(1, pos)
    pos = pos - (w - lo <= hi - w).long()
    return patterns[order.gather(1, pos)].permute(2, 0, 1)


def _row_error(w, alphas, offsets, signs) -> torch.Tensor:
    return (w - combine(offsets[:, None], alphas[:, :, None], signs)).pow(2).sum(dim=1)


def _least_squares(w, signs, alphas, offsets, with_offset: bool):
    """Alphas (and offset) minimising each row's squared error for fixed signs, rounded as stored;
    rows where that is singular or no better keep their previous values."""
    basis = _signed(signs).permute(1, 2, 0)  # [rows, cols, q]
    if with_offset:
        basis = torch.cat([torch.ones_like(basis[..., :1]), basis], dim=2)
    gram = basis.transpose(1, 2) @ basis
    rhs = (basis.transpose(1, 2) @ w[..., None])[..., 0]
    solution, info = torch.linalg.solve_ex(gram, rhs)
    new_off = solution[:, 0] if with_offset else offsets
    new_alphas, new_off = _stored(solution[:, int(with_offset) :].T, new_off)
    better = (info == 0) & torch.isfinite(solution).all(dim=1)
    better &= _row_error(w, new_alphas, new_off, signs) <= _row_error(w, alphas, offsets, signs)
    return torch.where(better, new_alphas, alphas), torch.where(better, new_off, offsets)


def _greedy(w: torch.Tensor, planes: int, with_offset: bool):
    """Offset = mean, then each plane the sign of the residual with alpha its mean magnitude."""
    offsets = w.mean(dim=1) if with_offset else torch.zeros_like(w[:, 0])
    residual = w - offsets[:, None]
    alphas = []
    for _ in range(planes):
        alphas.append(residual.abs().mean(dim=1))
        residual = residual - alphas[-1][:, None] * torch.where(residual >= 0, 1.0, -1.0)
    return _stored(torch.stack(alphas), offsets)


def _uniform(w: torch.Tensor, planes: int):
    """The asymmetric min/max grid of each row in BCQ form (alphas through fp16: a halved fp16 scale
    may round, which only moves this starting point)."""
    scale, zero = UniformGrid(planes, sym=False).params(w)
    alphas, offsets = _uniform_params(scale, zero, planes)
    return _stored(alphas, offsets)


def fit_rows(w: torch.Tensor, planes: int, rounds: int, with_offset: bool):
    """(alphas [q, rows] and offsets [rows] as stored, in fp32; signs [q, rows, cols]) for each row
    of ``w``. Starts from LUT-GEMM's greedy fit or, with an offset, from the asymmetric min/max
    uniform grid in BCQ form, whichever has the lower error per row (greedy alone stays above the
    uniform grid at 4 bits on Gaussian weights), then ``rounds`` of alternating least-squares alphas
    and optimal signs. A row's error never grows from one round to the next, so with an offset
    it never exceeds the uniform grid's."""
    w = w.float()
    alphas, offsets = _greedy(w, planes, with_offset)
    signs = nearest_signs(w, alphas, offsets)
    if with_offset:
        u_alphas, u_offsets = _uniform(w, planes)
        u_signs = nearest_signs(w, u_alphas, u_offsets)
        take = _row_error(w, u_alphas, u_offsets, u_signs) < _row_error(w, alphas, offsets, signs)
        alphas, offsets = torch.where(take, u_alphas, alphas), torch.where(take, u_offsets, offsets)
        signs = torch.where(take[:, None], u_signs, signs)
    for _ in range(rounds):
        alphas, offsets = _least_squares(w, signs, alphas, offsets, with_offset)
        signs = nearest_signs(w, alphas, offsets)
    return alphas, offsets, signs


def fit(weight: torch.Tensor, planes: int, group_size: int, rounds: int, with_offset: bool = True) -> BCQWeight:
    """Round-to-nearest BCQ of ``weight`` [out, in], each (row, group) fitted on its own."""
    out, n_in = weight.shape
    check_shape(n_in, group_size, planes)
    groups = n_in // group_size
    rows = weight.float().reshape(out * groups, group_size)
    alphas, offsets, signs = fit_rows(rows, planes, rounds, with_offset)
    return BCQWeight(
        planes=pack_planes(signs.reshape(planes, out, n_in)),
        alphas=alphas.reshape(planes, out, groups).transpose(1, 2).to(SCALE_DTYPE).contiguous(),
        offsets=offsets.reshape(out, groups).T.contiguous(),
        group_size=group_size,
    )


def from_uniform(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int, grid_offset: float = 0.0
) -> BCQWeight:
    """The exact BCQ form of a uniform grid (codes [out, in], fp16 scales and integer zero points
    [groups, out], contiguous groups): with code = sum_i 2^i c_i and c_i = (b_i + 1) / 2,
    (code - zero + grid_offset) * scale = scale ((2^q - 1) / 2 - zero + grid_offset)
    + sum_i scale 2^(i-1) b_i. Raises if a halved scale is not an fp16 number (a subnormal one)."""
    check_shape(codes.shape[1], group_size, bits)
    alphas, offsets = _uniform_params(scales, zeros, bits, grid_offset)
    if not torch.equal(alphas.to(SCALE_DTYPE).float(), alphas):
        raise TreeqError("uniform -> BCQ: a scale too small for fp16 to hold its half; keep the uniform format")
    return BCQWeight(planes_from_codes(codes, bits), alphas.to(SCALE_DTYPE), offsets, group_size)


def _uniform_params(scale: torch.Tensor, zero: torch.Tensor, bits: int, grid_offset: float = 0.0):
    """(alphas [bits, ...], offsets) in fp32 of the uniform grid with these scales and zero points."""
    scale = scale.float()
    alphas = torch.stack([scale * 2.0 ** (i - 1) for i in range(bits)])
    return alphas, scale * ((2**bits - 1) / 2 - zero.float() + grid_offset)
