// 4-bit weights times bf16 activations on x86 CPUs with AVX512-BF16 (and AMX-BF16 when present).
//
// Layout. Weights are kept in the operand layout of AMX's bf16 tile product: for a block of 16
// output rows and 32 inputs, a 16 x 32 "B tile" whose row p holds, for each output row n, the
// codes of inputs 2p and 2p+1. Rows 2t and 2t+1 of a tile share 32 bytes (low and high nibbles),
// so one 32-byte load yields two tile rows. Blocks go in units of four (the last unit may have
// fewer) whose tiles are interleaved, tile by tile, so a unit is one sequential stream for the AMX
// path, which works on a unit at a time. The same tiles serve the vector path: a tile row is
// 16 pairs, exactly what one AVX512 bf16 dot-product instruction consumes against a broadcast
// activation pair, with the 16 output rows in the 16 lanes (no horizontal sums, scales applied
// per lane).
//
// Numerics. A code q becomes the bf16 number 1 + q/16 by two bit operations (q in the top four
// mantissa bits of 1.0; no table lookup, which cost two permutes per 64 codes on the port that
// also widens the bytes, and made one token on one core compute-bound). Then
// (q - zero) * scale = 16 * scale * (1 + q/16) - (16 + zero) * scale, so the dot product of x
// with these numbers is multiplied by 16 * scale, and the zero point enters once per group as
// -(16 + zero) * scale * sum(x over the group). Products of bf16 numbers are exact in fp32; the
// summed terms are up to four times the centred codes' size, which costs the fp32 sums up to two
// bits (max difference from the fp32 reference ~1e-6 of the output on a 4096-wide layer).
//
// Paths. The vector path streams the codes and expands them once per four token rows; the
// expanded path expands each group of a unit once per block of token rows into a buffer that the
// vector units then multiply with every row; the AMX path does the same with tiles. The panel
// paths (long prompts) dequantize each unit's weights once per call into bf16 panels, each weight
// rounded once from the fp32 product (q - zero) * scale as the reference kernel rounds it, which
// AMX tiles or the vector units then multiply; for the longest prompts with AMX,
// treeq_int4_dequantize writes the same weights in blocks for oneDNN's bf16 GEMM.
#include "avx512_tiles.h"

namespace {

constexpr int kBlockBytes = kTileN * kTileK / 2;  // one tile, 256 bytes
// A unit's weights are one sequential stream; asking for them this far ahead keeps the loads
// from waiting on memory, which the hardware prefetcher alone did not. The L1 prefetches are few
// in flight (fill buffers); asking L2 for the stream further ahead as well keeps more requests
// outstanding, which one core needs to approach the memory bandwidth (3-7% at one token).
constexpr int kPrefetchBytes = 2048;
constexpr int kPrefetchL2Bytes = 16384;

// The 64 bytes at src go to L1 from kPrefetchBytes ahead and to L2 from kPrefetchL2Bytes ahead.
inline void prefetch_stream(const uint8_t* src) {
    _mm_prefetch((const char*)src + kPrefetchBytes, _MM_HINT_T0);
    _mm_prefetch((const char*)src + kPrefetchL2Bytes, _MM_HINT_T1);
}

// Two B-tile rows (2t, 2t+1) as bf16 (1 + q/16) from the 32 bytes that hold them.
inline void unpack_pair(const uint8_t* src, __m512i* even, __m512i* odd) {
    const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)src));
    const __m512i mantissa = _mm512_set1_epi16(0x78), one = _mm512_set1_epi16(0x3F80);
    // (a & b) | c: the nibble, moved to mantissa bits 3-6, over the bits of 1.0.
    *even = _mm512_ternarylogic_epi32(_mm512_slli_epi16(v, 3), mantissa, one, 0xEA);
    *odd = _mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 1), mantissa, one, 0xEA);
}

// A group's 16 multipliers 16 * scale (scales kept in fp16, as checkpoints store them) and
// offsets (16 + zero) * scale, both exact in fp32: 48 bytes per group and block instead of 128 in
// fp32, read once per weight pass.
inline void group_params(const uint16_t* scales, const uint8_t* zeros, __m512* s, __m512* o) {
    const __m512 scale = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)scales));
    const __m512 z = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)zeros)));
    *s = _mm512_mul_ps(scale, _mm512_set1_ps(16.0f));
    *o = _mm512_mul_ps(_mm512_add_ps(z, _mm512_set1_ps(16.0f)), scale);
}

// Per-group sums of each token row: the zero-point term needs them.
void group_sums(const uint16_t* x, int64_t M, int64_t K, int64_t gs, float* out) {
    const int64_t G = K / gs;
    for (int64_t m = 0; m < M; ++m)
        for (int64_t g = 0; g < G; ++g) {
            __m512 s = _mm512_setzero_ps();
            for (int64_t k = g * gs; k < (g + 1) * gs; k += 16) {
                const __m256i h = _mm256_loadu_si256((const __m256i*)(x + m * K + k));
                s = _mm512_add_ps(s, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
            }
            out[m * G + g] = _mm512_reduce_add_ps(s);
        }
}

// Vector path: R token rows against one block of 16 output rows, K inputs.
template <int R>
void block_vector(const uint16_t* x, int64_t K, const uint8_t* w, int64_t stride, const uint16_t* scales,
                  const uint8_t* zeros, const float* xsum, int64_t gs, uint16_t* y, int64_t N) {
    const int64_t G = K / gs;
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
        // Two chains per token row hide the dot product's latency.
        __m512 dot[R][2];
        for (int r = 0; r < R; ++r) dot[r][0] = dot[r][1] = _mm512_setzero_ps();
        for (int64_t k0 = g * gs; k0 < (g + 1) * gs; k0 += kTileK) {
            const uint8_t* src = w + (k0 / kTileK) * stride;
            for (int t = 0; t < kTileK / 4; ++t) {
                __m512i even, odd;
                if (t % 2 == 0) prefetch_stream(src + 32 * t);
                unpack_pair(src + 32 * t, &even, &odd);
                for (int r = 0; r < R; ++r) {
                    const uint32_t* xp = (const uint32_t*)(x + r * K + k0) + 2 * t;
                    dot[r][0] = _mm512_dpbf16_ps(dot[r][0], (__m512bh)_mm512_set1_epi32(xp[0]), (__m512bh)even);
                    dot[r][1] = _mm512_dpbf16_ps(dot[r][1], (__m512bh)_mm512_set1_epi32(xp[1]), (__m512bh)odd);
                }
            }
        }
        __m512 s, o;
        group_params(scales + g * kTileN, zeros + g * kTileN, &s, &o);
        for (int r = 0; r < R; ++r) {
            acc[r] = _mm512_fmadd_ps(_mm512_add_ps(dot[r][0], dot[r][1]), s, acc[r]);
            acc[r] = _mm512_fnmadd_ps(_mm512_set1_ps(xsum[r * G + g]), o, acc[r]);
        }
    }
    for (int r = 0; r < R; ++r) store_bf16_lanes(y + r * N, acc[r]);
}

// w: the block's first tile; stride: bytes from one of its tiles to the next (its unit's width).
void rows_vector(const uint16_t* x, int64_t M, int64_t K, const uint8_t* w, int64_t stride, const uint16_t* scales,
                 const uint8_t* zeros, const float* xsum, int64_t gs, uint16_t* y, int64_t N) {
    const int64_t G = K / gs;
    for (int64_t m = 0; m < M; m += 4) {
        const uint16_t* xm = x + m * K;
        const float* sm = xsum + m * G;
        uint16_t* ym = y + m * N;
        switch (M - m) {
            case 1: block_vector<1>(xm, K, w, stride, scales, zeros, sm, gs, ym, N); break;
            case 2: block_vector<2>(xm, K, w, stride, scales, zeros, sm, gs, ym, N); break;
            case 3: block_vector<3>(xm, K, w, stride, scales, zeros, sm, gs, ym, N); break;
            default: block_vector<4>(xm, K, w, stride, scales, zeros, sm, gs, ym, N); break;
        }
    }
}

// Paths that expand each group's codes of a unit once per call into a per-thread buffer bbuf
// (NB * gs * 16 bf16): block b's tile rows in order, one pair of inputs for 16 outputs per 64
// bytes, then multiply every token row with it.

// w: the first block's first tile in a unit of `stride` blocks (whose tiles interleave).
template <int NB>
void expand_group(const uint8_t* w, int64_t stride, int64_t g, int64_t tiles, uint16_t* bbuf) {
    for (int64_t i = 0; i < tiles; ++i)
        for (int b = 0; b < NB; ++b) {
            const uint8_t* src = w + ((g * tiles + i) * stride + b) * kBlockBytes;
            uint16_t* dst = bbuf + (b * tiles + i) * kTileN * kTileK;
            for (int t = 0; t < kTileK / 4; ++t) {
                __m512i even, odd;
                if (t % 2 == 0) prefetch_stream(src + 32 * t);
                unpack_pair(src + 32 * t, &even, &odd);
                _mm512_store_si512(dst + 64 * t, even);
                _mm512_store_si512(dst + 64 * t + 32, odd);
            }
        }
}

// Expanded vector path: R token rows (x at the first one's group start) against the NB expanded
// blocks of one group; the group's dot products, scaled and offset, added to the fp32 sums acc
// (row stride NB * 16).
// R x NB sums stay in registers (24 of the 32 at 6 x 4) so the dot-product units, not their
// latency or the loads, set the pace, as in a GEMM library's inner kernel.
template <int NB, int R>
void group_rows_expanded(const uint16_t* x, int64_t K, const uint16_t* bbuf, int64_t pairs, const __m512* s,
                         const __m512* o, const float* xsum, int64_t G, float* acc) {
    __m512 dot[R][NB];
    for (int r = 0; r < R; ++r)
        for (int b = 0; b < NB; ++b) dot[r][b] = _mm512_setzero_ps();
    const uint32_t* xp = (const uint32_t*)x;
    for (int64_t p = 0; p < pairs; ++p) {
        __m512bh wv[NB];
        for (int b = 0; b < NB; ++b) wv[b] = (__m512bh)_mm512_load_si512(bbuf + (b * pairs + p) * 2 * kTileN);
        for (int r = 0; r < R; ++r) {
            const __m512bh xb = (__m512bh)_mm512_set1_epi32(xp[r * K / 2 + p]);
            for (int b = 0; b < NB; ++b) dot[r][b] = _mm512_dpbf16_ps(dot[r][b], xb, wv[b]);
        }
    }
    for (int r = 0; r < R; ++r)
        for (int b = 0; b < NB; ++b) {
            float* a = acc + (r * NB + b) * kTileN;
            const __m512 v = _mm512_fmadd_ps(dot[r][b], s[b], _mm512_loadu_ps(a));
            _mm512_storeu_ps(a, _mm512_fnmadd_ps(_mm512_set1_ps(xsum[r * G]), o[b], v));
        }
}

constexpr int kExpandedRows = 6;

// All M token rows against NB blocks of a unit of `stride` blocks (the caller keeps M small enough
// for these rows' inputs to stay in L2 across units: see kExpandedRowBlock); acc: M * NB * 16 fp32
// scratch.
template <int NB>
void blocks_expanded(const uint16_t* x, int64_t M, int64_t K, const uint8_t* w, int64_t stride,
                     const uint16_t* scales, const uint8_t* zeros, const float* xsum, int64_t gs, uint16_t* y,
                     int64_t N, uint16_t* bbuf, float* acc) {
    const int64_t G = K / gs, tiles = gs / kTileK, pairs = gs / 2;
    constexpr int W = NB * kTileN;  // outputs handled here
    memset(acc, 0, sizeof(float) * M * W);
    for (int64_t g = 0; g < G; ++g) {
        expand_group<NB>(w, stride, g, tiles, bbuf);
        __m512 s[NB], o[NB];
        for (int b = 0; b < NB; ++b) group_params(scales + (b * G + g) * kTileN, zeros + (b * G + g) * kTileN, &s[b], &o[b]);
        for (int64_t m0 = 0; m0 < M; m0 += kExpandedRows) {
            const uint16_t* xm = x + m0 * K + g * gs;
            const float* sm = xsum + m0 * G + g;
            float* am = acc + m0 * W;
            switch (M - m0) {
                case 1: group_rows_expanded<NB, 1>(xm, K, bbuf, pairs, s, o, sm, G, am); break;
                case 2: group_rows_expanded<NB, 2>(xm, K, bbuf, pairs, s, o, sm, G, am); break;
                case 3: group_rows_expanded<NB, 3>(xm, K, bbuf, pairs, s, o, sm, G, am); break;
                case 4: group_rows_expanded<NB, 4>(xm, K, bbuf, pairs, s, o, sm, G, am); break;
                case 5: group_rows_expanded<NB, 5>(xm, K, bbuf, pairs, s, o, sm, G, am); break;
                default: group_rows_expanded<NB, kExpandedRows>(xm, K, bbuf, pairs, s, o, sm, G, am); break;
            }
        }
    }
    store_bf16(acc, M, W, W, y, N);
}

// AMX path. A unit's blocks of 16 outputs share each activation tile: tile 0 holds 16 token rows
// x 32 inputs, tiles 1 and 6 alternate as weight tiles, tiles 2..5 accumulate one block each.
// With M > 16 a last partial group of token rows is read from a zero-padded copy.

// NB blocks of 16 outputs (weights w[b] in a unit of `stride` blocks, per-group scale and offset
// vectors) for all M token rows. bbuf: NB * gs * 16 bf16 scratch; acc: M * 16 * NB fp32 scratch;
// tail: the last M % 16 token rows padded to 16 (or null).
template <int NB>
void blocks_amx(const uint16_t* x, const uint16_t* tail, int64_t M, int64_t K, const uint8_t* w, int64_t stride,
                const uint16_t* scales, const uint8_t* zeros, const float* xsum, int64_t gs, uint16_t* y, int64_t N,
                uint16_t* bbuf, float* acc) {
    const int64_t G = K / gs, tiles = gs / kTileK;
    constexpr int W = NB * kTileN;  // outputs handled here
    alignas(64) float c[16 * 16];
    memset(acc, 0, sizeof(float) * M * W);
    for (int64_t g = 0; g < G; ++g) {
        expand_group<NB>(w, stride, g, tiles, bbuf);  // once, reused by every 16 token rows
        for (int64_t m0 = 0; m0 < M; m0 += 16) {
            const int64_t rows = M - m0 < 16 ? M - m0 : 16;
            const uint16_t* xa = (rows < 16 && tail ? tail : x + m0 * K) + g * gs;
            _tile_zero(2);
            if constexpr (NB > 1) _tile_zero(3);
            if constexpr (NB > 2) _tile_zero(4);
            if constexpr (NB > 3) _tile_zero(5);
            for (int64_t i = 0; i < tiles; ++i) {
                const uint16_t* bt = bbuf + i * kTileN * kTileK;
                const int64_t stride = tiles * kTileN * kTileK;
                _tile_loadd(0, xa + i * kTileK, K * 2);
                _tile_loadd(1, bt, 64);
                _tile_dpbf16ps(2, 0, 1);
                if constexpr (NB > 1) { _tile_loadd(6, bt + stride, 64); _tile_dpbf16ps(3, 0, 6); }
                if constexpr (NB > 2) { _tile_loadd(1, bt + 2 * stride, 64); _tile_dpbf16ps(4, 0, 1); }
                if constexpr (NB > 3) { _tile_loadd(6, bt + 3 * stride, 64); _tile_dpbf16ps(5, 0, 6); }
            }
            for (int b = 0; b < NB; ++b) {
                acc_store(b, c, 16);
                __m512 s, o;
                group_params(scales + (b * G + g) * kTileN, zeros + (b * G + g) * kTileN, &s, &o);
                for (int64_t r = 0; r < rows; ++r) {
                    float* a = acc + (m0 + r) * W + b * kTileN;
                    const __m512 v = _mm512_fmadd_ps(_mm512_load_ps(c + r * 16), s, _mm512_loadu_ps(a));
                    _mm512_storeu_ps(a, _mm512_fnmadd_ps(_mm512_set1_ps(xsum[(m0 + r) * G + g]), o, v));
                }
            }
        }
    }
    store_bf16(acc, M, W, W, y, N);
}

// One 16 x 32 tile of block rows as bf16 pairs: rows[p] holds, per output lane, inputs 2p and 2p + 1.
// group_scales, group_zeros: the 16 lanes' scales (fp16) and zero points of the tile's group.
// Bytes widened one to a lane land in pair order already: byte 2n holds output n's inputs 4t and
// 4t + 2 (low, high nibble), byte 2n + 1 its inputs 4t + 1 and 4t + 3, so the low nibbles of bytes
// 0..15 are pair 2t of outputs 0..7 and the high ones pair 2t + 1, each lane's scale and zero point
// its output's (a permute per element, as before, cost more than these per-lane parameters).
void dequantize_tile(const uint8_t* src, const uint16_t* group_scales, const uint8_t* group_zeros,
                     __m512i rows[16]) {
    const __m512 scale = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)group_scales));
    const __m512i zero = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)group_zeros));
    const __m512i first = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
    const __m512i second = _mm512_add_epi32(first, _mm512_set1_epi32(8));
    const __m512 s[2] = {_mm512_permutexvar_ps(first, scale), _mm512_permutexvar_ps(second, scale)};
    const __m512i z[2] = {_mm512_permutexvar_epi32(first, zero), _mm512_permutexvar_epi32(second, zero)};
    const __m512i nibble = _mm512_set1_epi32(15);
    for (int t = 0; t < kTileK / 4; ++t) {
        __m512 f[2][2];  // [pair 2t or 2t + 1][outputs 0..7 or 8..15]
        for (int h = 0; h < 2; ++h) {
            const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(src + 32 * t + 16 * h)));
            const __m512i q[2] = {_mm512_and_si512(v, nibble), _mm512_srli_epi32(v, 4)};
            for (int r = 0; r < 2; ++r) f[r][h] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(q[r], z[h])), s[h]);
        }
        rows[2 * t] = (__m512i)_mm512_cvtne2ps_pbh(f[0][1], f[0][0]);
        rows[2 * t + 1] = (__m512i)_mm512_cvtne2ps_pbh(f[1][1], f[1][0]);
    }
}

// Input tiles k0..k1 of NB blocks into panel: tile i of block b at ((i - k0) * NB + b) * 512. w: the
// first block's first tile in a unit of `stride` blocks (whose tiles interleave).
template <int NB>
void dequantize_panel(const uint8_t* w, int64_t stride, const uint16_t* scales, const uint8_t* zeros, int64_t G,
                      int64_t gs, int64_t k0, int64_t k1, uint16_t* panel) {
    for (int64_t i = k0; i < k1; ++i) {
        const int64_t g = i * kTileK / gs;
        for (int b = 0; b < NB; ++b) {
            __m512i rows[16];
            const int64_t at = (b * G + g) * kTileN;  // the group's 16 scales and zero points
            dequantize_tile(w + (i * stride + b) * kBlockBytes, scales + at, zeros + at, rows);
            uint16_t* dst = panel + ((i - k0) * NB + b) * kTileN * kTileK;
            for (int p = 0; p < kTileK / 2; ++p) _mm512_store_si512(dst + p * 2 * kTileN, rows[p]);
        }
    }
}

inline Item item_of(int64_t t, int64_t split, int64_t blocks, const uint8_t* w, int64_t block_bytes,
                    const uint16_t* scales, const uint8_t* zeros, int64_t G) {
    Item it = place_of(t, split, blocks);
    const int64_t b0 = t / split * kMaxBlocks;
    it.w = w + b0 * block_bytes + (it.b - b0) * kBlockBytes;
    it.scales = scales + it.b * G * kTileN;
    it.zeros = zeros + it.b * G * kTileN;
    return it;
}

// Weights a panel path reads: fill<NB>(it, k0, k1, panel) writes input tiles k0..k1 of work item
// it's NB blocks as dequantize_panel does.
// 4-bit codes in the tile layout (treeq_int4_matmul's arguments).
struct Int4Tiles {
    const uint8_t* w;
    const uint16_t* scales;
    const uint8_t* zeros;
    int64_t blocks, block_bytes, G, gs;
    Item item(int64_t t, int64_t split) const { return item_of(t, split, blocks, w, block_bytes, scales, zeros, G); }
    template <int NB>
    void fill(const Item& it, int64_t k0, int64_t k1, uint16_t* panel, bool) const {
        dequantize_panel<NB>(it.w, it.stride, it.scales, it.zeros, G, gs, k0, k1, panel);
    }
};

// Token rows per pass of the expanded path: their inputs (768 KiB at 4096 wide) stay in a 1 MiB
// L2 across units. Of 48, 96 and 192 rows, 96 was ahead or even at 256 and 1024 tokens (Zen 5).
constexpr int64_t kExpandedRowBlock = 16 * kExpandedRows;

}  // namespace

// y[M, N] = x[M, K] bf16 @ W^T with W = (q - zero) * scale per group of gs inputs, summed in fp32 and
// written in bf16 by every path.
// w: the tile layout above, per unit of nb <= 4 blocks [K/32][nb][256 bytes]; scales: [N/16][G][16]
// fp16; zeros: the same layout in uint8. N is a multiple of 16; K and gs multiples of 32.
// path: 0 streams the codes through the vector units (few tokens), 1 expands them once per call
// for the vector units, 2 for AMX tiles (falling back to 1 where the CPU has no AMX), 3 dequantizes
// them for AMX tiles (the AMX panel path; only where treeq_amx_supported, else y is left as it was),
// 4 dequantizes them likewise for the vector units (the vector panel path).
extern "C" void treeq_int4_matmul(const uint16_t* x, int64_t M, int64_t K, const uint8_t* w, const uint16_t* scales,
                                  const uint8_t* zeros, int64_t N, int64_t gs, uint16_t* y, int threads, int path) {
    if (M == 0) return;  // a tile of zero rows is an invalid configuration
    const int64_t G = K / gs, blocks = N / kTileN, block_bytes = (K / kTileK) * kBlockBytes;
    const Int4Tiles src{w, scales, zeros, blocks, block_bytes, G, gs};
    if (path == 3 || path == 4) {
        if (path == 3 && !amx_usable()) return;  // its weights are dequantized for tiles: nothing else runs them
        panel_matmul(x, M, K, N, y, threads, path == 3, false, src);
        return;
    }
    const bool amx = path == 2 && amx_usable(), expanded = !amx && path != 0;
    float* xsum = (float*)scratch(0, sizeof(float) * M * G);
    group_sums(x, M, K, gs, xsum);
    const uint16_t* tail = amx ? padded_tail(x, M, K) : nullptr;
    const int64_t split = item_split(blocks, threads), items = (blocks + kMaxBlocks - 1) / kMaxBlocks * split;
#pragma omp parallel num_threads(threads)
    {
        uint16_t* bbuf = nullptr;
        float* acc = nullptr;
        if (amx || expanded) bbuf = (uint16_t*)scratch(2, sizeof(uint16_t) * kMaxBlocks * gs * kTileN);
        if (amx) {
            configure_tiles(M < 16 ? int(M) : 16);
            acc = (float*)scratch(3, sizeof(float) * M * kMaxBlocks * kTileN);
        }
        if (expanded) acc = (float*)scratch(3, sizeof(float) * (M < kExpandedRowBlock ? M : kExpandedRowBlock) * kMaxBlocks * kTileN);
        // Expanded path: a block of token rows through every unit, then the next block, so each
        // block's inputs are read from memory once rather than once per unit. A static schedule
        // gives each thread the same work items in every block, and they write disjoint outputs, so
        // no thread waits for the others between blocks (on a busy machine each wait could cost
        // a time slice).
        for (int64_t m1 = 0; expanded && m1 < M; m1 += kExpandedRowBlock) {
            const int64_t rows = M - m1 < kExpandedRowBlock ? M - m1 : kExpandedRowBlock;
            const uint16_t* xm = x + m1 * K;
            const float* sm = xsum + m1 * G;
#pragma omp for schedule(static) nowait
            for (int64_t t = 0; t < items; ++t) {
                const Item it = src.item(t, split);
                if (it.nb <= 0) continue;
                uint16_t* ym = y + m1 * N + it.b * kTileN;
                switch (it.nb) {
                    case 1: blocks_expanded<1>(xm, rows, K, it.w, it.stride, it.scales, it.zeros, sm, gs, ym, N, bbuf, acc); break;
                    case 2: blocks_expanded<2>(xm, rows, K, it.w, it.stride, it.scales, it.zeros, sm, gs, ym, N, bbuf, acc); break;
                    case 3: blocks_expanded<3>(xm, rows, K, it.w, it.stride, it.scales, it.zeros, sm, gs, ym, N, bbuf, acc); break;
                    default: blocks_expanded<4>(xm, rows, K, it.w, it.stride, it.scales, it.zeros, sm, gs, ym, N, bbuf, acc); break;
                }
            }
        }
        if (!expanded) {
#pragma omp for schedule(static)
            for (int64_t t = 0; t < items; ++t) {
                const Item it = src.item(t, split);
                if (it.nb <= 0) continue;
                uint16_t* yb = y + it.b * kTileN;
                if (!amx) {
                    for (int64_t j = 0; j < it.nb; ++j)
                        rows_vector(x, M, K, it.w + j * kBlockBytes, it.stride * kBlockBytes, it.scales + j * G * kTileN,
                                    it.zeros + j * G * kTileN, xsum, gs, yb + j * kTileN, N);
                    continue;
                }
                switch (it.nb) {
                    case 1: blocks_amx<1>(x, tail, M, K, it.w, it.stride, it.scales, it.zeros, xsum, gs, yb, N, bbuf, acc); break;
                    case 2: blocks_amx<2>(x, tail, M, K, it.w, it.stride, it.scales, it.zeros, xsum, gs, yb, N, bbuf, acc); break;
                    case 3: blocks_amx<3>(x, tail, M, K, it.w, it.stride, it.scales, it.zeros, xsum, gs, yb, N, bbuf, acc); break;
                    default: blocks_amx<4>(x, tail, M, K, it.w, it.stride, it.scales, it.zeros, xsum, gs, yb, N, bbuf, acc); break;
                }
            }
        }
        if (amx) _tile_release();
    }
}

// Rows n0..n1 of the weight as bf16 at out, for a bf16 GEMM. layout 0: [n1 - n0][K] (n0, n1 multiples of
// 16); layout R (32 or 64): oneDNN's blocked weight (AB16b<R>a2b: per R rows x 32 inputs, 16 pairs of
// inputs for each of the R rows; n0, n1 multiples of R), which its GEMM reads without repacking it
// first. A tile's pairs are that layout's rows already, so layout R also skips the transpose.
extern "C" void treeq_int4_dequantize(const uint8_t* w, const uint16_t* scales, const uint8_t* zeros, int64_t N,
                                      int64_t K, int64_t gs, int64_t n0, int64_t n1, uint16_t* out, int layout,
                                      int threads) {
    const int64_t G = K / gs, blocks = N / kTileN, tiles = K / kTileK, block_bytes = tiles * kBlockBytes;
#pragma omp parallel for num_threads(threads) schedule(static) collapse(2)
    for (int64_t b = n0 / kTileN; b < n1 / kTileN; ++b)
        for (int64_t i = 0; i < tiles; ++i) {
            const int64_t unit = b / kMaxBlocks, j = b % kMaxBlocks, first = unit * kMaxBlocks;
            const int64_t nb = blocks - first < kMaxBlocks ? blocks - first : kMaxBlocks;
            const uint8_t* src = w + first * block_bytes + (i * nb + j) * kBlockBytes;
            const int64_t g = i * kTileK / gs, n = b * kTileN - n0;
            __m512i rows[16];
            dequantize_tile(src, scales + (b * G + g) * kTileN, zeros + (b * G + g) * kTileN, rows);
            if (layout == 0) {
                transpose16(rows);
                for (int r = 0; r < kTileN; ++r) _mm512_storeu_si512(out + (n + r) * K + i * kTileK, rows[r]);
            } else {
                const int64_t R = layout;
                uint16_t* dst = out + ((n / R * tiles + i) * 16 * R + n % R) * 2;
                for (int p = 0; p < kTileK / 2; ++p) _mm512_storeu_si512(dst + p * R * 2, rows[p]);
            }
        }
}
