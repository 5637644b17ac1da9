// Gram matrix of bf16 rows accumulated in fp32, for CPUs with AVX512-BF16 but no AMX, where
// oneDNN ignores its "bf16" fp32-matmul mode and a bf16 GEMM would round its output.
//
// h = beta * h + alpha * x^T x, x [n, d] bf16. One AVX512 bf16 dot-product instruction multiplies
// 16 pairs of bf16 numbers and adds each pair's two products to an fp32 lane; products of bf16
// numbers are exact in fp32, so every entry is an fp32 sum of exact products, in token order and
// independent of the thread count. (The instruction counts bf16 denormals, below 2^-126, as zero.)
//
// Layout. x is repacked once into strips of 16 features: strip s holds, for each token pair p,
// the 16 features' values at tokens 2p and 2p+1 side by side (32 bf16, one cache line). A strip's
// row p is then one operand of the instruction (16 output columns in the lanes), and one 32-bit
// element of it, broadcast, is the other (one output row). Features are padded to a multiple of
// 16 and tokens to an even count with zeros, which add nothing.
//
// Blocking. A micro-tile is 8 rows x 3 strips (48 columns): 24 accumulators, 3 loads and a
// broadcast fill the 32 vector registers, and it runs over every token pair without leaving
// registers. Only tiles reaching the upper triangle are computed; each entry above the diagonal
// is written to both its places, so h stays exactly symmetric. Tiles sharing columns run one
// after another on a thread, so their 3 strips (192 bytes per token pair) stay in L2.

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <mutex>
#include <vector>

namespace {

constexpr int64_t kLanes = 16;  // fp32 lanes of a vector: output columns per strip
constexpr int kRows = 8;        // output rows of a micro-tile
constexpr int kStrips = 3;      // strips of a micro-tile

// 16 values of a row from column c on (masked to m), as bf16 bits in the low half of 32-bit lanes.
__m512i load_bf16(const uint16_t* row, int64_t c, __mmask16 m) {
    return _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, row + c));
}

// The same from fp32, rounded to nearest even as torch rounds to bf16 (NaN becomes 0x7FC0).
__m512i load_bf16(const float* row, int64_t c, __mmask16 m) {
    const __m512 v = _mm512_maskz_loadu_ps(m, row + c);
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
    return _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), rounded, _mm512_set1_epi32(0x7FC0));
}

// Q[s][p][l] = x[2p][16s + l] | x[2p + 1][16s + l] << 16 as bf16, zero-padded.
template <typename T>
void pack(const T* x, int64_t n, int64_t d, int64_t pairs, int64_t strips, uint32_t* q) {
#pragma omp for schedule(static)
    for (int64_t p = 0; p < pairs; ++p) {
        const T* a = x + 2 * p * d;
        const T* b = 2 * p + 1 < n ? a + d : nullptr;
        for (int64_t s = 0; s < strips; ++s) {
            const int64_t c = s * kLanes, left = d - c;
            const __mmask16 m = left >= kLanes ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
            const __m512i lo = load_bf16(a, c, m);
            const __m512i hi = b ? load_bf16(b, c, m) : _mm512_setzero_si512();
            _mm512_store_si512(q + (s * pairs + p) * kLanes, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
        }
    }
}

// acc[r][c * 16 + l] = sum over pairs of rows' element r times strip c's lane l.
template <int C>
void micro_tile(const uint32_t* rows, const uint32_t* cols, int64_t pairs, float* acc) {
    __m512 a[kRows][C];
    for (int r = 0; r < kRows; ++r)
        for (int c = 0; c < C; ++c) a[r][c] = _mm512_setzero_ps();
    for (int64_t p = 0; p < pairs; ++p) {
        __m512bh v[C];
        for (int c = 0; c < C; ++c) v[c] = (__m512bh)_mm512_load_si512(cols + (c * pairs + p) * kLanes);
        const uint32_t* row = rows + p * kLanes;
        for (int r = 0; r < kRows; ++r) {
            const __m512bh w = (__m512bh)_mm512_set1_epi32(int(row[r]));
            for (int c = 0; c < C; ++c) a[r][c] = _mm512_dpbf16_ps(a[r][c], v[c], w);
        }
    }
    for (int r = 0; r < kRows; ++r)
        for (int c = 0; c < C; ++c) _mm512_storeu_ps(acc + r * kStrips * kLanes + c * kLanes, a[r][c]);
}

// The packed copy of x, kept between calls and grown to the largest: a fresh one of a calibration
// batch's size (4-13 MB) cost as much in page faults as the products of a 576-wide layer.
std::mutex packed_lock;
uint32_t* packed = nullptr;
size_t packed_cap = 0;

uint32_t* packed_buffer(size_t bytes) {
    if (bytes > packed_cap) {
        free(packed);
        packed_cap = (bytes + 63) / 64 * 64;
        packed = (uint32_t*)aligned_alloc(64, packed_cap);
    }
    return packed;
}

}  // namespace

extern "C" int treeq_gram_supported() {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512bf16");
}

// h[d, d] fp32 = beta * h + alpha * x^T x, x[n, d] row-major bf16, or fp32 (x_fp32) rounded to bf16
// here, which spares the caller a rounded copy; h must be symmetric.
extern "C" void treeq_gram_bf16(const void* x, int x_fp32, int64_t n, int64_t d, float* h, float beta, float alpha,
                                int threads) {
    const int64_t pairs = (n + 1) / 2, strips = (d + kLanes - 1) / kLanes;
    std::lock_guard<std::mutex> hold(packed_lock);
    uint32_t* q = packed_buffer(sizeof(uint32_t) * kLanes * strips * pairs);
    // Tiles (column group, row block) in column-group order, rows only up to the diagonal.
    std::vector<int64_t> tiles;
    for (int64_t g = 0; g * kStrips < strips; ++g) {
        const int64_t col_end = (g + 1) * kStrips * kLanes < d ? (g + 1) * kStrips * kLanes : d;
        for (int64_t i0 = 0; i0 < col_end; i0 += kRows) tiles.push_back(g << 32 | i0);
    }
    const int64_t n_tiles = int64_t(tiles.size());
#pragma omp parallel num_threads(threads)
    {
        // Each ends in the implicit barrier of its omp for.
        if (x_fp32)
            pack((const float*)x, n, d, pairs, strips, q);
        else
            pack((const uint16_t*)x, n, d, pairs, strips, q);
        alignas(64) float acc[kRows * kStrips * kLanes];
#pragma omp for schedule(static)
        for (int64_t t = 0; t < n_tiles; ++t) {
            const int64_t g = tiles[t] >> 32, i0 = tiles[t] & 0xFFFFFFFF;
            const int64_t s0 = g * kStrips, c = strips - s0 < kStrips ? strips - s0 : kStrips;
            const uint32_t* rows = q + (i0 / kLanes * pairs) * kLanes + i0 % kLanes;
            const uint32_t* cols = q + s0 * pairs * kLanes;
            switch (c) {
                case 1: micro_tile<1>(rows, cols, pairs, acc); break;
                case 2: micro_tile<2>(rows, cols, pairs, acc); break;
                default: micro_tile<3>(rows, cols, pairs, acc); break;
            }
            for (int64_t r = 0; r < kRows && i0 + r < d; ++r) {
                const int64_t i = i0 + r;
                const int64_t j_end = (s0 + c) * kLanes < d ? (s0 + c) * kLanes : d;
                for (int64_t j = i > s0 * kLanes ? i : s0 * kLanes; j < j_end; ++j) {
                    const float v = beta * h[i * d + j] + alpha * acc[r * kStrips * kLanes + (j - s0 * kLanes)];
                    h[i * d + j] = v;
                    h[j * d + i] = v;
                }
            }
        }
    }
}
