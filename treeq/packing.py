"""GPTQ checkpoint layout: integer codes packed into int32 words along dimension 0.

Codes are laid out as one little-endian bit stream, so 2/4/8-bit codes sit whole inside a word and
3-bit codes straddle word boundaries exactly as GPTQ's 3-bit format does (32 codes in 3 words).
"""

from __future__ import annotations

import math

import torch

WORD_BITS = 32


def period(bits: int) -> tuple[int, int]:
    """(codes, words) of the shortest run after which the bit layout repeats."""
    words = bits // math.gcd(bits, WORD_BITS)
    return words * WORD_BITS // bits, words


def check_packable(n: int, bits: int, what: str) -> None:
    codes, _ = period(bits)
    if n % codes:
        raise ValueError(f"{what}={n} is not a multiple of {codes}, which {bits}-bit packing needs")


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes [n, m] (0 <= code < 2^bits) into int32 words [n * bits / 32, m]."""
    n, m = codes.shape
    check_packable(n, bits, "rows")
    per, words_per = period(bits)
    blocks = codes.to(torch.int64).reshape(n // per, per, m)
    words = torch.zeros(n // per, words_per, m, dtype=torch.int64, device=codes.device)
    for i in range(per):
        word, shift = divmod(i * bits, WORD_BITS)
        v = blocks[:, i]
        words[:, word] |= (v << shift) & 0xFFFFFFFF
        if shift + bits > WORD_BITS:
            words[:, word + 1] |= v >> (WORD_BITS - shift)
    return _to_int32(words.reshape(-1, m))


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack`: int32 words [w, m] -> codes [w * 32 / bits, m] as uint8."""
    per, words_per = period(bits)
    w, m = packed.shape
    words = packed.to(torch.int64).reshape(w // words_per, words_per, m) & 0xFFFFFFFF
    mask = 2**bits - 1
    out = torch.empty(w // words_per, per, m, dtype=torch.int64, device=packed.device)
    for i in range(per):
        word, shift = divmod(i * bits, WORD_BITS)
        v = words[:, word] >> shift
        if shift + bits > WORD_BITS:
            v = v | (words[:, word + 1] << (WORD_BITS - shift))
        out[:, i] = v & mask
    return out.reshape(-1, m).to(torch.uint8)


def pack_flat(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Non-negative integers of any shape -> int32 words [n, 1], zero-padded to whole periods."""
    flat = values.reshape(-1, 1).to(torch.int64)
    per, _ = period(bits)
    pad = -flat.shape[0] % per
    return pack(torch.cat([flat, flat.new_zeros(pad, 1)]), bits)


def unpack_flat(words: torch.Tensor, bits: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack_flat`: the first prod(shape) integers (int64) in ``shape``."""
    return unpack(words, bits)[: math.prod(shape), 0].reshape(shape).to(torch.int64)
