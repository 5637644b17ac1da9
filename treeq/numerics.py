"""The one home of quantization grids.

Methods, packers, kernels and tests all quantize and dequantize through these classes, so the
fake-quant weight a method optimises against is bit-for-bit the weight a kernel reconstructs from
the checkpoint. Three rules make that hold:

* scales are rounded to the checkpoint's storage dtype (fp16) the moment they are computed, so no
  method ever sees a scale the checkpoint cannot store;
* every grid stores unsigned codes [0, 2^bits - 1] and an integer zero point in the GPTQ layout; a
  grid whose levels sit between integers adds a grid-wide constant ``offset`` (recorded in the
  checkpoint's quantization_config), never a fractional zero point;
* dequantization is always ``(code - zero + offset) * scale`` evaluated in fp32, in that order.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import ClassVar

import torch

from . import clip_error

SCALE_DTYPE = torch.float16
SUPPORTED_BITS = (2, 3, 4, 6, 8)

# GPTQ's mse observer shrinks the range by up to 80% in 100 steps, error measured as |w - q|^2.4,
# which weighs large errors a little more than squared error. Here a coarse pass (steps of 0.04)
# and a fine one (steps of 0.008 around each row's best) reach the same resolution in 32 tries.
CLIP_COARSE = torch.linspace(1.0, 0.2, 21)
CLIP_FINE = torch.linspace(-0.04, 0.04, 11)
CLIP_NORM = 2.4
# Candidates, and weights per candidate, searched at a time (rows are independent): temporaries of
# 4 x 16384 fp32 (256 KB; 256 rows of a 64-wide group) stay in L2 and below the looper's mmap
# threshold (treeq.engine.memory), where every fresh page costs a fault: on 1536-row groups 3x faster than
# 4 candidates over every row. At least CLIP_MIN_ROWS rows, so wide groups take few Python steps.
CLIP_CHUNK = 4
CLIP_ELEMENTS = 16384
CLIP_MIN_ROWS = 16

FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_INT4_EPS = 1e-6
# Output rows per step where a whole weight-sized temporary would set a low-memory run's peak.
ROW_CHUNK = 256


def group_width(group_size: int, in_features: int) -> int:
    """Input channels per group: ``group_size``, or the whole row for -1."""
    return in_features if group_size == -1 else group_size


def _storable(scale: torch.Tensor) -> torch.Tensor:
    """The scale as the checkpoint will hold it, back in fp32; a zero scale (all-zero group, or one
    too small for fp16) becomes 1, which codes that group's zeros exactly."""
    scale = scale.to(SCALE_DTYPE).float()
    return torch.where(scale > 0, scale, torch.ones_like(scale))


@dataclass(frozen=True)
class Grid:
    """Per-group uniform grid: ``params`` from one group's weights [rows, group], then codes."""

    name: ClassVar[str]
    offset: ClassVar[float] = 0.0  # added to (code - zero) before scaling
    bits_allowed: ClassVar[tuple[int, ...]] = SUPPORTED_BITS
    # Whether raw_params reads only each row's smallest and largest weight (the clip search then
    # scales those instead of whole rows).
    params_from_range: ClassVar[bool] = False

    bits: int
    clip_search: bool = field(default=False, kw_only=True)  # GPTQ's mse observer over CLIP_RATIOS

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    @property
    def min_code(self) -> int:
        return 0

    def for_weight(self, w: torch.Tensor) -> "Grid":
        """The grid one weight [out, in] is quantized on: a grid with per-row parameters (QRazor's
        row scale) returns a copy holding them; the others are the same grid for every weight."""
        return self

    def prepare(self, w: torch.Tensor) -> torch.Tensor:
        """Whole-weight transform applied once before grouping (identity for one-stage grids)."""
        return w

    def raw_params(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unrounded scale and integer zero point per row of a group ``w`` (fp32)."""
        raise NotImplementedError

    def params(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Storable scale and zero point per row of ``w`` (rows = output channels, columns = one group)."""
        w = w.float()
        if not self.clip_search:
            scale, zero = self.raw_params(w)
            return _storable(scale), zero
        if self.params_from_range:  # the candidates' params are read from two columns
            return self._clip_search(w)
        rows = max(CLIP_MIN_ROWS, CLIP_ELEMENTS // w.shape[1])  # each candidate scales whole rows
        found = [self._clip_search(part) for part in w.split(rows)]
        return torch.cat([scale for scale, _ in found]), torch.cat([zero for _, zero in found])

    def _clip_search(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Candidates' params come from the scaled row extremes where they stand in for the scaled
        # row: r * w rounds monotonically for r > 0, so fl(r * min w) = min fl(r * w).
        src = torch.stack([w.amin(dim=1), w.amax(dim=1)], dim=1) if self.params_from_range else w
        coarse = CLIP_COARSE.to(w.device)[:, None].expand(-1, w.shape[0])
        err, scale, zero, ratio = self._best_clip(w, src, coarse)
        fine = (ratio[None] + CLIP_FINE.to(w.device)[:, None]).clamp(float(CLIP_COARSE.min()), float(CLIP_COARSE.max()))
        err_f, scale_f, zero_f, _ = self._best_clip(w, src, fine)
        better = err_f < err  # ties keep the coarse pick, so an unclipped row stays unclipped
        return torch.where(better, scale_f, scale), torch.where(better, zero_f, zero)

    def _best_clip(self, w: torch.Tensor, src: torch.Tensor, ratios: torch.Tensor):
        """Per row of ``w``, the candidate of ``ratios`` [candidates, rows] with the least clipped
        weight error: (error, scale, zero, ratio); the first candidate wins ties. ``src``: what
        ``raw_params`` reads, ``w`` or its rows' extremes."""
        rows, cols = src.shape
        step = max(1, CLIP_CHUNK * CLIP_ELEMENTS // src.numel())  # temporaries within L2
        found = [self.raw_params((src[None] * r[..., None]).reshape(-1, cols)) for r in ratios.split(step)]
        s, z = (torch.cat(t).reshape(-1, rows) for t in zip(*found))
        s = _storable(s)
        err = self._clip_errors(w, s, z)
        best = err.argmin(dim=0, keepdim=True)
        return tuple(t.gather(0, best)[0] for t in (err, s, z, ratios))

    def _clip_errors(self, w: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """sum |w - fake_quant(w)|^CLIP_NORM per candidate and row of ``w``, for the candidates'
        scale and zero ``s``, ``z`` [candidates, rows]: in one native pass (:mod:`.clip_error`), or in
        torch where it cannot run or the grid rounds its own way."""
        if self.standard_rounding:
            err = clip_error.errors(w, s, z, self.offset, self.min_code, self.maxq, CLIP_NORM)
            if err is not None:
                return err
        rows = max(CLIP_MIN_ROWS, CLIP_ELEMENTS // w.shape[1])  # temporaries within L2, few Python steps
        blocks = zip(w.split(rows), s.split(rows, dim=1), z.split(rows, dim=1))
        return torch.cat([self._torch_clip_errors(*block) for block in blocks], dim=1)

    def _torch_clip_errors(self, w: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        found = []
        for s_, z_ in zip(s[..., None].split(CLIP_CHUNK), z[..., None].split(CLIP_CHUNK)):
            found.append((w[None] - self.fake_quantize(w[None], s_, z_)).abs_().pow_(CLIP_NORM).sum(dim=2))
        return torch.cat(found)

    @property
    def standard_rounding(self) -> bool:
        """Whether this grid quantizes and dequantizes by Grid's own rules below, which native
        loops (the clip search's error pass, GPTQ's columns) repeat; a grid that overrides them is
        run in torch there."""
        return type(self).quantize is Grid.quantize and type(self).dequantize is Grid.dequantize

    def quantize(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Integer codes for ``w``; ``scale``/``zero`` broadcast against it."""
        return torch.clamp(torch.round(w.float() / scale - self.offset) + zero, self.min_code, self.maxq)

    def dequantize(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return dequantize(codes, scale, zero, self.offset)

    def fake_quantize(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return self.dequantize(self.quantize(w, scale, zero), scale, zero)

    def describe(self) -> dict:
        """What a checkpoint records so a loader rebuilds the same dequantization."""
        return {"grid": self.name, "grid_offset": self.offset}


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, offset: float = 0.0) -> torch.Tensor:
    return (codes.float() - zero + offset) * scale


@dataclass(frozen=True)
class UniformGrid(Grid):
    """GPTQ's min/max grid: asymmetric with a per-group integer zero point, or (sym) the zero point
    pinned to the middle code and scale 2·absmax / (2^bits - 1)."""

    name = "minmax"
    params_from_range = True
    sym: bool = True

    def raw_params(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lo = w.amin(dim=1).clamp(max=0)
        hi = w.amax(dim=1).clamp(min=0)
        if self.sym:
            # Pinning the zero point to the middle code keeps a symmetric checkpoint loadable by
            # kernels that ignore qzeros.
            scale = 2 * torch.maximum(lo.abs(), hi) / self.maxq
            return scale, torch.full_like(scale, (self.maxq + 1) // 2)
        scale = (hi - lo) / self.maxq
        # The zero point is derived from the stored scale so -lo lands on a code after rounding.
        return scale, torch.round(-lo / _storable(scale)).clamp(0, self.maxq)


@dataclass(frozen=True)
class _Centred(Grid):
    """Signed codes stored with the constant zero point 2^(bits-1); scale = reach / steps."""

    params_from_range = True  # while reach is the largest magnitude

    def reach(self, w: torch.Tensor) -> torch.Tensor:
        return w.abs().amax(dim=1)

    @property
    def steps(self) -> float:
        raise NotImplementedError

    def raw_params(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = self.reach(w) / self.steps
        return scale, torch.full_like(scale, 2 ** (self.bits - 1))


@dataclass(frozen=True)
class RestrictedGrid(_Centred):
    """Symmetric without a zero point: codes [-(2^(b-1) - 1), 2^(b-1) - 1], e.g. [-7, 7]."""

    name = "restricted"

    @property
    def min_code(self) -> int:
        return 1

    @property
    def steps(self) -> float:
        return 2 ** (self.bits - 1) - 1


@dataclass(frozen=True)
class SignedGrid(_Centred):
    """The full signed range [-2^(b-1), 2^(b-1) - 1], e.g. [-8, 7], scale absmax / 2^(b-1): the most
    negative weight lands on the extra code and the most positive clips one step short."""

    name = "signed"

    @property
    def steps(self) -> float:
        return 2 ** (self.bits - 1)


@dataclass(frozen=True)
class HalfStepGrid(_Centred):
    """Levels at ±0.5s, ±1.5s, ... ±(2^(b-1) - 0.5)s: no exact zero, every code used symmetrically."""

    name = "half-step"
    offset = 0.5

    @property
    def steps(self) -> float:
        return 2 ** (self.bits - 1) - 0.5

    def lut(self) -> tuple[torch.Tensor, float]:
        """The grid as a lookup table for LUT kernels: weight = table[code] * table_scale * scale,
        equal in fp32 to :meth:`dequantize` because table_scale is a power of two."""
        codes = torch.arange(self.maxq + 1)
        return (2 * (codes - 2 ** (self.bits - 1)) + 1).to(torch.int32), 0.5

    def describe(self) -> dict:
        table, table_scale = self.lut()
        return {**super().describe(), "lut": {"table": table.tolist(), "table_scale": table_scale}}


@dataclass(frozen=True)
class StretchedGrid(HalfStepGrid):
    """torchao PARQ's stretched uniform grid: the half-step grid over the reach
    min(bits · mean|w|, max|w|), so at 2-3 bits outliers clip and the levels spread over the bulk."""

    name = "stretched"
    params_from_range = False  # its reach reads the mean magnitude too

    def reach(self, w: torch.Tensor) -> torch.Tensor:
        a = w.abs()
        return torch.minimum(self.bits * a.mean(dim=1), a.amax(dim=1))


@dataclass(frozen=True)
class Fp8Int4Grid(SignedGrid):
    """FBGEMM's two-stage fp8 -> int4: each row round-trips through float8 e4m3 with scale
    amax/448, then int4 per group with scale max(amax, 1e-6)/8 and codes [-8, 7]."""

    name = "fp8-int4"
    bits_allowed = (4,)

    def prepare(self, w: torch.Tensor) -> torch.Tensor:
        w = w.float()
        amax = w.abs().amax(dim=1, keepdim=True)
        row_scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
        return (w / row_scale).to(torch.float8_e4m3fn).float() * row_scale

    def reach(self, w: torch.Tensor) -> torch.Tensor:
        return w.abs().amax(dim=1).clamp(min=FP8_INT4_EPS)


# ---- QRazor's significant-data razoring (Lee et al., 2025) ----
# Values on an integer base grid (absmax to 8 bits for weights and the KV cache, wider for
# activations) keep, per group, their sign and the ``kept`` magnitude bits that start at the
# group's leading one: the value is sign * mag * 2^shift in base units, one shift per group. Both
# steps are here once, for weights (QRazorGrid), activations and the KV cache.
FP16_MAX = 65504.0


def razor_shift(amax: torch.Tensor, kept: int, max_shift: torch.Tensor | int) -> torch.Tensor:
    """Per group, the shift that puts the leading one of ``amax`` (the group's largest magnitude in
    base units) at the top of ``kept`` bits: floor(log2 amax) - (kept - 1), within [0, max_shift];
    0 below 2^kept. frexp reads the exponent exactly (no log2 rounding)."""
    _, exp = torch.frexp(amax.float().clamp(min=1))  # amax = m * 2^exp with m in [0.5, 1)
    return torch.minimum((exp - kept).clamp(min=0), torch.as_tensor(max_shift, device=amax.device))


def razor_round(x: torch.Tensor, kept: int) -> torch.Tensor:
    """Signed magnitudes of ``x`` (in units of the group's step) rounded to the nearest, ties away
    from zero (the hardware rule: add the first dropped bit), saturated at 2^kept - 1, in fp32."""
    a = x.float().abs()
    mag = a.floor()
    mag = mag + (a - mag >= 0.5).float()  # a - floor(a) is exact in fp32
    return torch.copysign(mag.clamp(max=2**kept - 1), x.float())


def absmax_integers(
    x: torch.Tensor, base_bits: int, scale_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """(integers, scale) of x [..., K] absmax-quantized per row of K to ``base_bits``: scale =
    amax|x| / (2^(base_bits-1) - 1) rounded to ``scale_dtype`` (what a cache stores; 1 where it
    comes out 0), integers round(x / scale) clamped to the range, in fp32; scale [..., 1] fp32."""
    base_max = 2 ** (base_bits - 1) - 1
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / base_max).to(scale_dtype).float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.clamp(torch.round(xf / scale), -base_max, base_max), scale


def razor_groups(q: torch.Tensor, bits: int, group: int, max_shift: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Integers q [..., K] razored per group of ``group`` along K to a sign and bits - 1 bits:
    (signed magnitudes [..., K], shifts int64 [..., K / group]); the value is mag * 2^shift."""
    grouped = q.unflatten(-1, (q.shape[-1] // group, group))
    shift = razor_shift(grouped.abs().amax(dim=-1), bits - 1, max_shift)
    mag = razor_round(grouped / torch.exp2(shift.float())[..., None], bits - 1)
    return mag.flatten(-2), shift


def unrazor(mag: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """mag * 2^shift * scale in fp32, each shift repeated over its group (:func:`razor_groups`)."""
    group = mag.shape[-1] // shift.shape[-1]
    return (mag.float().unflatten(-1, (shift.shape[-1], group)) * torch.exp2(shift.float())[..., None]).flatten(
        -2
    ) * scale


@dataclass(frozen=True)
class QRazorGrid(RestrictedGrid):
    """QRazor's weight grid: each row absmax-quantized to BASE_BITS (scale r = amax / 127, fp16),
    then each group razored to a sign and bits - 1 magnitude bits. As a grid that is the
    restricted one, codes [-(2^(b-1) - 1), 2^(b-1) - 1] around zero point 2^(b-1), with group scale
    r * 2^shift: any GPTQ kernel runs it, and the compact checkpoint (treeq/formats/qrazor.py)
    stores codes, SHIFT_BITS-bit shifts and one fp16 r per row.

    RTN rounds in two stages as the paper does: to the 8-bit grid (prepare), then the razor (ties
    away from zero). GPTQ starts from the 8-bit weight and pushes errors onto columns not yet
    quantized, which then round straight onto the razored grid. clip_search tries each group one
    shift lower (its largest values saturate) and one higher (none saturates), and keeps the shift
    with the least weight error."""

    name = "qrazor"
    bits_allowed = (2, 3, 4)
    BASE_BITS: ClassVar[int] = 8
    SHIFT_BITS: ClassVar[int] = 3

    row_scale: torch.Tensor | None = field(default=None, kw_only=True, compare=False, repr=False)

    @property
    def kept(self) -> int:
        return self.bits - 1

    def for_weight(self, w: torch.Tensor) -> "QRazorGrid":
        return replace(self, row_scale=absmax_integers(w, self.BASE_BITS, SCALE_DTYPE)[1][:, 0])

    def _rows(self) -> torch.Tensor:
        if self.row_scale is None:
            raise ValueError("the qrazor grid needs each row's scale: quantize on grid.for_weight(weight)")
        return self.row_scale

    def prepare(self, w: torch.Tensor) -> torch.Tensor:
        q, r = absmax_integers(w, self.BASE_BITS, SCALE_DTYPE)  # r is the row scale for_weight binds
        return q * r

    def _max_shift(self) -> torch.Tensor:
        """Per row, the largest shift the flags hold whose scale r * 2^shift fp16 still holds."""
        _, exp = torch.frexp(FP16_MAX / self._rows())
        return (exp - 1).clamp(max=2**self.SHIFT_BITS - 1)

    def raw_params(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = self._rows()
        shift = razor_shift(w.abs().amax(dim=1) / r, self.kept, self._max_shift())
        scale = r * torch.exp2(shift.float())
        return scale, torch.full_like(scale, 2 ** (self.bits - 1))

    def params(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Scales are fp16 already (r is, and a power of two below fp16's maximum keeps it so).
        w = w.float()
        scale, zero = self.raw_params(w)
        if not self.clip_search:
            return scale, zero

        def error(s: torch.Tensor) -> torch.Tensor:
            return (w - self.fake_quantize(w, s[:, None], zero[:, None])).abs().pow(CLIP_NORM).sum(dim=1)

        r, best, least = self._rows(), scale, error(scale)
        highest = r * torch.exp2(self._max_shift().float())
        for other in (torch.where(scale > r, scale / 2, scale), torch.where(scale < highest, scale * 2, scale)):
            err = error(other)
            best, least = torch.where(err < least, other, best), torch.minimum(err, least)  # ties keep the razor's
        return best, zero

    def quantize(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return razor_round(w.float() / scale, self.kept) + zero

    def describe(self) -> dict:
        return {**super().describe(), "base_bits": self.BASE_BITS, "shift_bits": self.SHIFT_BITS}


# Activations: each token absmax-quantized to this many bits (QRazor's 16-bit base for
# activations), then razored per group of input channels, at run time.
ACTIVATION_RAZOR_BASE_BITS = 16


def fake_quantize_razored_activation(x: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """x [..., K] quantized as QRazor does activations and dequantized, in x's dtype: per token
    16-bit absmax integers with an fp32 scale (:func:`absmax_integers`), razored per group of
    ``group`` channels (:func:`razor_groups`)."""
    q, scale = absmax_integers(x, ACTIVATION_RAZOR_BASE_BITS)
    mag, shift = razor_groups(q, bits, group, ACTIVATION_RAZOR_BASE_BITS)
    return unrazor(mag, shift, scale).to(x.dtype)


GRIDS: dict[str, type[Grid]] = {
    g.name: g for g in (UniformGrid, RestrictedGrid, SignedGrid, HalfStepGrid, StretchedGrid, Fp8Int4Grid, QRazorGrid)
}
# Grids whose dequantization is the classic (code - zero) * scale: any GPTQ kernel runs them exactly.
INTEGER_ZERO_GRIDS = frozenset(name for name, g in GRIDS.items() if g.offset == 0)


def make_grid(name: str, bits: int, sym: bool = True, clip_search: bool = False) -> Grid:
    if name == UniformGrid.name:
        return UniformGrid(bits, sym, clip_search=clip_search)
    return GRIDS[name](bits, clip_search=clip_search)


def dequantize_grouped(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor, grid: str = "minmax"
) -> torch.Tensor:
    """Weight [out, in] from codes [out, in] and per-group params [groups, out] indexed by g_idx.
    Taken ROW_CHUNK output rows at a time: whole-matrix gathers of the params and the chain of
    temporaries were 5x the weight's size, the peak of low-memory runs."""
    g, offset = g_idx.long(), GRIDS[grid].offset
    w = torch.empty(codes.shape, dtype=torch.float32, device=codes.device)
    for lo in range(0, codes.shape[0], ROW_CHUNK):
        hi = lo + ROW_CHUNK
        s, z = scales[:, lo:hi].float()[g].T, zeros[:, lo:hi].float()[g].T
        w[lo:hi] = dequantize(codes[lo:hi], s, z, offset)
    return w


def quantize_grouped(
    w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor, grid: str, bits: int
) -> torch.Tensor:
    """Codes [out, in] (uint8) of ``w`` rounded to the nearest level of given per-group params, the
    inverse of :func:`dequantize_grouped` on them: re-rounding a weight trained on fixed levels."""
    g = g_idx.long()
    levels = GRIDS[grid](bits)
    return levels.quantize(w, scales.float()[g].T, zeros.float()[g].T).to(torch.uint8)


def _ste(value: torch.Tensor, through: torch.Tensor) -> torch.Tensor:
    """``value`` in the forward pass, the identity's gradient to ``through`` in the backward."""
    return through + (value - through).detach()


def minmax_params(w: torch.Tensor, maxq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable asymmetric scale and (real-valued) zero point per row of ``w``, from its
    min and max; the start point of learned quantizers."""
    lo, hi = w.amin(dim=-1, keepdim=True), w.amax(dim=-1, keepdim=True)
    scale = _ste((hi - lo).clamp(min=1e-5), hi - lo) / maxq
    return scale, -lo / scale


def fake_quantize_learned(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """:meth:`UniformGrid.fake_quantize` with learnable ``scale`` and real ``zero``: rounding and
    clamping pass gradients straight through, the scale is the fp16 value a checkpoint stores and
    the zero point the integer it stores, so the exported codes dequantize to this very weight."""
    scale = _ste(scale.clamp(min=1e-5).to(SCALE_DTYPE).float(), scale)
    zero = _ste(torch.round(zero).clamp(0, maxq), zero)
    codes = _ste(torch.round(w / scale), w / scale) + zero
    codes = _ste(codes.clamp(0, maxq), codes)
    return (codes - zero) * scale


# ---- activation quantization ----
# A matmul's input quantized at run time, one scale per token row (per_token) or per tensor. The
# integer W8A8 kernel (treeq.kernels.w8a8_vnni) computes exactly this, bit for bit, and the
# fake-quant path of other activation widths dequantizes it. Every step is exact or a single IEEE
# rounding (amax, one division for the scale, one division per value, round half to even), so a
# kernel can match it; a kernel must divide as here, not multiply by a reciprocal. Inputs must be
# finite. A scale that comes out 0 (an all-zero row, or an amax so small the division underflows)
# becomes 1, which codes those values as 0 exactly.
ACTIVATION_BITS = tuple(range(2, 9))


def quantize_activation(
    x: torch.Tensor, bits: int, per_token: bool = True, sym: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes like x, scale, zero) for x [..., K], in fp32 whatever x's dtype. scale and zero
    (int32) have x's leading shape per token, shape [] per tensor; their values are
    :func:`activation_params` of the range of x (per token or over the tensor)."""
    _check_activation_bits(bits)
    xf = x.float()
    dims = (-1,) if per_token else tuple(range(xf.dim()))
    if sym:
        scale, zero = activation_params(None, xf.abs().amax(dim=dims), bits, sym)
    else:
        scale, zero = activation_params(xf.amin(dim=dims), xf.amax(dim=dims), bits, sym)
    s, z = (scale[..., None], zero[..., None]) if per_token else (scale, zero)
    return quantize_activation_with(xf, s, z, bits, sym), scale, zero


def _check_activation_bits(bits: int) -> None:
    if bits not in ACTIVATION_BITS:
        raise ValueError(f"activation bits={bits} not in {ACTIVATION_BITS}")


def activation_params(
    low: torch.Tensor | None, high: torch.Tensor, bits: int, sym: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale fp32, zero int32) of an input range, measured at run time (per token, per tensor)
    or once in calibration (static ranges). sym: ``high`` is amax|x|, scale = high / qmax with
    qmax = 2^(bits-1) - 1, zero 0. asym: scale = (max(high, 0) - min(low, 0)) / (2^bits - 1),
    zero = clamp(round(-min(low, 0) / scale), 0, 2^bits - 1)."""
    if sym:
        scale = high.float() / (2 ** (bits - 1) - 1)
    else:
        lo = low.float().clamp(max=0)
        scale = (high.float().clamp(min=0) - lo) / (2**bits - 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if sym:
        return scale, torch.zeros_like(scale, dtype=torch.int32)
    return scale, torch.round(-lo / scale).clamp(0, 2**bits - 1).to(torch.int32)


def quantize_activation_with(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, sym: bool
) -> torch.Tensor:
    """Codes of x on given levels (``scale``, ``zero`` broadcast against x): sym: int8
    clamp(round(x / scale), -qmax, qmax); asym: uint8 clamp(round(x / scale) + zero, 0, 2^bits - 1).
    Values beyond a calibrated range clamp to its ends."""
    _check_activation_bits(bits)
    qmin, qmax = (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if sym else (0, 2**bits - 1)
    codes = torch.clamp(torch.round(x.float() / scale) + zero, qmin, qmax)
    return codes.to(torch.int8 if sym else torch.uint8)


def dequantize_activation(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """(codes - zero) * scale in fp32; scale and zero as :func:`quantize_activation` returns them."""
    per_token = scale.dim() > 0
    return dequantize(codes, scale[..., None] if per_token else scale, zero[..., None] if per_token else zero)


def fake_quantize_activation(x: torch.Tensor, bits: int, per_token: bool = True, sym: bool = True) -> torch.Tensor:
    """x quantized and dequantized, back in x's dtype."""
    return dequantize_activation(*quantize_activation(x, bits, per_token, sym)).to(x.dtype)


# ---- KV-cache quantization ----
# KIVI's asymmetric grid: per group, 2^bits levels spread from the group's minimum to its maximum.
# Unlike UniformGrid's range, the range need not contain 0 and the offset is the (real) minimum,
# not an integer zero point: a key channel living in [3, 5] spends every level inside [3, 5]. The
# cache is read only by treeq, so no kernel needs GPTQ's integer zero point. Scale and minimum are
# rounded to fp16 (what the cache stores) before the codes are taken, so decoding is exact.


def quantize_minmax_groups(
    x: torch.Tensor, bits: int, dim: int, group: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, scale, low) for ``x`` cut along ``dim`` into runs of ``group`` consecutive entries,
    each other index its own group. codes (uint8, like x) = clamp(round((x - low) / scale), 0,
    2^bits - 1); scale = (max - min) / (2^bits - 1) and low = min per group, fp16, shaped like x
    with ``dim`` shrunk to ``x.shape[dim] // group``; a constant group gets scale 1."""
    n = x.shape[dim]
    if n % group:
        raise ValueError(f"{n} entries along dim {dim} do not split into groups of {group}")
    maxq = 2**bits - 1
    grouped = x.float().movedim(dim, -1).unflatten(-1, (n // group, group))
    low = grouped.amin(dim=-1).to(SCALE_DTYPE)
    scale = _storable((grouped.amax(dim=-1) - low.float()) / maxq)
    codes = torch.clamp(torch.round((grouped - low.float()[..., None]) / scale[..., None]), 0, maxq)
    codes = codes.flatten(-2).to(torch.uint8)
    return codes.movedim(-1, dim), scale.to(SCALE_DTYPE).movedim(-1, dim), low.movedim(-1, dim)


def dequantize_minmax_groups(
    codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, dim: int, group: int
) -> torch.Tensor:
    """codes * scale + low in fp32, each group's scale and low repeated over its ``group`` entries."""
    scale, low = (t.float().repeat_interleave(group, dim=dim) for t in (scale, low))
    return codes.float() * scale + low


# ---- Lookup-table levels (KVQuant's KV cache: uniform or non-uniform levels in [-1, 1]) ----


def storable_range(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(center, half-width) of [lo, hi] as fp16 holds them, back in fp32; a zero width becomes 1
    (a constant group then codes its value at the level nearest 0)."""
    return ((hi + lo) / 2).to(SCALE_DTYPE).float(), _storable((hi - lo) / 2)


def quantize_to_levels(x: torch.Tensor, center: torch.Tensor, half: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Codes (uint8) of the level (ascending, at most 256, in [-1, 1]) nearest to each entry of
    ``(x - center) / half``, clamped to [-1, 1] first; a tie goes to the lower level."""
    normalized = ((x.float() - center) / half).clamp(-1, 1)
    return torch.bucketize(normalized, (levels[1:] + levels[:-1]) / 2).to(torch.uint8)


def dequantize_levels(
    codes: torch.Tensor, center: torch.Tensor, half: torch.Tensor, levels: torch.Tensor
) -> torch.Tensor:
    """levels[code] * half + center in fp32."""
    return levels[codes.long()] * half + center
