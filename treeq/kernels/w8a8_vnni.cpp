// W8A8 on x86 CPUs with AVX512-VNNI: int8 activations times int8 weights, int32 sums.
//
// Activation quantizer. One scale per token row: scale = amax(|x|) / qmax, divided (not multiplied
// by a reciprocal), a scale of 0 replaced by 1, codes = clamp(round half to even(x / scale)), as
// treeq.numerics.quantize_activation computes it; every step is exact or one IEEE rounding, so
// the two agree bit for bit. Built with -ffp-contract=off so no multiply and add fuse into one
// rounding the reference does not make.
//
// GEMM. vpdpbusd multiplies unsigned by signed bytes. The weight is the unsigned operand: it is
// stored as w + 128 (0..255) at packing time, and the activation codes are the signed operand,
// read in place (no per-call copy of the activations, shifted or padded). The sums are then sum x*w + 128 * sum x, so 128 * (row sum of the codes) is subtracted per token
// row, from a row sum computed once per call. Products and sums are exact in int32 while
// K * 128 * 255 < 2^31 (K < 65793; the Python side caps K at 65536).
//
// Layout. Per block of 16 output rows, [K/4][16][4]: for each 4 consecutive inputs, the 16 rows'
// 4 bytes, so one 64-byte load feeds one vpdpbusd against the token's 4 codes broadcast, the 16
// outputs in the 16 lanes (no horizontal sums). K is padded to a multiple of 4 with stored 0
// (a product of 0 whatever the code), N to a multiple of 16 with rows never written out.
//
// No AMX-INT8 path: no machine this was written on has AMX to test it.
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

namespace {

constexpr int kLanes = 16;  // output rows per block
constexpr int kMaxBlocks = 4;  // blocks per unit: a micro-kernel's width
constexpr int kMaxRows = 6;  // token rows per micro-kernel: 6 x 4 sums + 4 weights + 1 broadcast
// Decoding streams the weight: asking for each block's bytes this far ahead keeps loads from
// waiting on memory.
constexpr int kPrefetchBytes = 1024;
// A unit's weight panel (its blocks x K) should stay in L2 while every token row passes over it,
// and a block of token rows' codes with it (L2: 1 MB on Zen 4 and 5, 2 MB on Sapphire Rapids).
constexpr int64_t kPanelBytes = 512 * 1024;
constexpr int64_t kRowBlockBytes = 448 * 1024;
// The slice of a panel that stays in L1 (48 KB on Zen 5 and Sapphire Rapids) with the rows' inputs.
constexpr int64_t kChunkBytes = 32 * 1024;

// Per-thread scratch kept between calls (slot 0: the row sums, 1: a task's int32 sums): decoding
// calls this hundreds of times per token.
void* scratch(int slot, size_t bytes) {
    thread_local void* buf[2] = {nullptr, nullptr};
    thread_local size_t cap[2] = {0, 0};
    if (bytes > cap[slot]) {
        free(buf[slot]);
        cap[slot] = (bytes + 63) / 64 * 64;
        buf[slot] = aligned_alloc(64, cap[slot]);
    }
    return buf[slot];
}

// 16 inputs from k (fewer under mask) as fp32; bf16 widens exactly by a shift.
inline __m512 load16(const void* row, bool bf16, int64_t k, __mmask16 mask) {
    if (bf16) {
        const __m256i h = _mm256_maskz_loadu_epi16(mask, (const uint16_t*)row + k);
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_maskz_loadu_ps(mask, (const float*)row + k);
}

void quantize_row(const void* row, bool bf16, int64_t K, int qmax, int8_t* codes, float* scale) {
    __m512 amax = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += kLanes) {
        const __mmask16 mask = K - k >= kLanes ? 0xFFFF : (__mmask16)((1u << (K - k)) - 1);
        amax = _mm512_max_ps(amax, _mm512_abs_ps(load16(row, bf16, k, mask)));
    }
    float s = _mm512_reduce_max_ps(amax) / (float)qmax;
    if (!(s > 0.0f)) s = 1.0f;
    *scale = s;
    const __m512 sv = _mm512_set1_ps(s);
    const __m512i hi = _mm512_set1_epi32(qmax), lo = _mm512_set1_epi32(-qmax);
    for (int64_t k = 0; k < K; k += kLanes) {
        const __mmask16 mask = K - k >= kLanes ? 0xFFFF : (__mmask16)((1u << (K - k)) - 1);
        const __m512 q = _mm512_div_ps(load16(row, bf16, k, mask), sv);
        __m512i i = _mm512_cvt_roundps_epi32(q, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        i = _mm512_max_epi32(_mm512_min_epi32(i, hi), lo);
        _mm512_mask_cvtepi32_storeu_epi8(codes + k, mask, i);
    }
}

// Sum of each token row's codes (Kp a multiple of 4): vpdpbusd against ones.
void row_sums(const int8_t* x, int64_t M, int64_t Kp, int32_t* out, int threads) {
    const __m512i ones = _mm512_set1_epi8(1);
    // Threads only for long prompts (as in treeq_w8a8_quantize).
#pragma omp parallel for num_threads(threads) schedule(static) if (M * Kp >= (1 << 20))
    for (int64_t m = 0; m < M; ++m) {
        const int8_t* r = x + m * Kp;
        __m512i s = _mm512_setzero_si512();
        for (int64_t k = 0; k < Kp; k += 64) {
            const __mmask64 mask = Kp - k >= 64 ? ~0ull : (1ull << (Kp - k)) - 1;
            s = _mm512_dpbusd_epi32(s, ones, _mm512_maskz_loadu_epi8(mask, r + k));
        }
        out[m] = _mm512_reduce_add_epi32(s);
    }
}

struct Epilogue {
    const float* xs;  // [M] token scales
    const float* ws;  // [N] output-row scales
    const float* bias;  // [N] or null
    const int32_t* xsum;  // [M] code row sums
    void* y;  // [M, N]
    int64_t N;
    int kind;  // 0 raw int32, 1 fp32, 2 bf16
};

// R x NB x 16 sums (token rows m0.., outputs n0..) into y, in the reference's order:
// ((float(acc) * xs) * ws) + bias, rounded once more to bf16 if asked.
__attribute__((noinline)) void finish(const int32_t* sums, int R, int NB, const Epilogue& e, int64_t m0, int64_t n0) {
    for (int b = 0; b < NB; ++b) {
        const int64_t n = n0 + b * kLanes;
        const __mmask16 mask = e.N - n >= kLanes ? 0xFFFF : (__mmask16)((1u << (e.N - n)) - 1);
        const __m512 ws = _mm512_maskz_loadu_ps(mask, e.ws + n);
        const __m512 bias = e.bias ? _mm512_maskz_loadu_ps(mask, e.bias + n) : _mm512_setzero_ps();
        for (int r = 0; r < R; ++r) {
            const int64_t m = m0 + r;
            const __m512i acc = _mm512_sub_epi32(_mm512_load_si512(sums + (r * NB + b) * kLanes),
                                                 _mm512_set1_epi32(128 * e.xsum[m]));
            if (e.kind == 0) {
                _mm512_mask_storeu_epi32((int32_t*)e.y + m * e.N + n, mask, acc);
                continue;
            }
            __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(acc), _mm512_set1_ps(e.xs[m])), ws);
            if (e.bias) v = _mm512_add_ps(v, bias);
            if (e.kind == 1)
                _mm512_mask_storeu_ps((float*)e.y + m * e.N + n, mask, v);
            else
                _mm256_mask_storeu_epi16((uint16_t*)e.y + m * e.N + n, mask, (__m256i)_mm512_cvtneps_pbh(v));
        }
    }
}

// GCC 12 kept the R x NB sums on the stack (a store per instruction, half the speed) unless these
// short loops are unrolled before it decides where arrays live.
#define UNROLL _Pragma("GCC unroll 8")

// R token rows (x: the first, row stride Kp) against NB blocks from w (block stride Kp * 16),
// inputs k0..k1; the R x NB sums stay in registers meanwhile and start from (first: zero) and end
// in sums [R][NB][16].
template <int NB, int R>
void micro(const int8_t* x, int64_t Kp, const uint8_t* w, int64_t k0, int64_t k1, int32_t* sums, bool first) {
    __m512i acc[R][NB];
    UNROLL for (int r = 0; r < R; ++r)
        UNROLL for (int b = 0; b < NB; ++b)
            acc[r][b] = first ? _mm512_setzero_si512() : _mm512_load_si512(sums + (r * NB + b) * kLanes);
    const int64_t stride = Kp * kLanes;
    for (int64_t k = k0; k < k1; k += 4) {
        __m512i wv[NB];
        UNROLL for (int b = 0; b < NB; ++b) {
            const uint8_t* src = w + b * stride + k * kLanes;
            if (R <= 2) _mm_prefetch((const char*)src + kPrefetchBytes, _MM_HINT_T0);
            wv[b] = _mm512_loadu_si512(src);
        }
        UNROLL for (int r = 0; r < R; ++r) {
            int32_t four;
            memcpy(&four, x + r * Kp + k, 4);
            const __m512i xb = _mm512_set1_epi32(four);
            UNROLL for (int b = 0; b < NB; ++b) acc[r][b] = _mm512_dpbusd_epi32(acc[r][b], wv[b], xb);
        }
    }
    UNROLL for (int r = 0; r < R; ++r)
        UNROLL for (int b = 0; b < NB; ++b) _mm512_store_si512(sums + (r * NB + b) * kLanes, acc[r][b]);
}

// M token rows from m0 against a unit of NB blocks (outputs from n0), then the epilogue. Inputs go
// in chunks whose panel slice (NB x 16 x kc bytes) stays in L1 while every row passes over it, so
// the panel's 256 bytes per step of 24 instructions come from L1, not L2 (K = 576, whose whole
// panel fits L1, ran at twice K = 4096's multiply-adds per second before; with chunks the gap
// stayed within the noise of the loaded machine it was measured on). sums: M rounded up to
// kMaxRows, x NB x 16 int32.
template <int NB>
void rows(const int8_t* x, int64_t M, int64_t Kp, const uint8_t* w, int64_t m0, int64_t n0, const Epilogue& e,
          int32_t* sums) {
    const int64_t kc = (kChunkBytes / (NB * kLanes)) / 4 * 4;
    for (int64_t k0 = 0; k0 < Kp; k0 += kc) {
        const int64_t k1 = Kp - k0 < kc ? Kp : k0 + kc;
        for (int64_t m = m0; m < m0 + M; m += kMaxRows) {
            const int8_t* xm = x + m * Kp;
            int32_t* s = sums + (m - m0) * NB * kLanes;
            switch (m0 + M - m) {
                case 1: micro<NB, 1>(xm, Kp, w, k0, k1, s, k0 == 0); break;
                case 2: micro<NB, 2>(xm, Kp, w, k0, k1, s, k0 == 0); break;
                case 3: micro<NB, 3>(xm, Kp, w, k0, k1, s, k0 == 0); break;
                case 4: micro<NB, 4>(xm, Kp, w, k0, k1, s, k0 == 0); break;
                case 5: micro<NB, 5>(xm, Kp, w, k0, k1, s, k0 == 0); break;
                default: micro<NB, kMaxRows>(xm, Kp, w, k0, k1, s, k0 == 0); break;
            }
        }
    }
    for (int64_t m = m0; m < m0 + M; m += kMaxRows) {
        const int r = m0 + M - m < kMaxRows ? int(m0 + M - m) : kMaxRows;
        finish(sums + (m - m0) * NB * kLanes, r, NB, e, m, n0);
    }
}

}  // namespace

extern "C" int treeq_w8a8_supported() {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vnni");
}

// codes [M, K] int8 and scale [M] fp32 from x [M, K] (bf16 if bf16 else fp32), qmax = 2^(bits-1) - 1.
extern "C" void treeq_w8a8_quantize(const void* x, int bf16, int64_t M, int64_t K, int qmax, int8_t* codes,
                                    float* scale, int threads) {
    const int64_t row_bytes = K * (bf16 ? 2 : 4);
    // Threads only for many rows: a decode step's row takes about a microsecond, and each parallel
    // region is a barrier where a thread the OS has put aside costs a whole time slice.
#pragma omp parallel for num_threads(threads) schedule(static) if (M * K >= (1 << 18))
    for (int64_t m = 0; m < M; ++m)
        quantize_row((const char*)x + m * row_bytes, bf16, K, qmax, codes + m * K, scale + m);
}

// y [M, N] = codes x [M, Kp] times the packed weight w (N rounded up to 16 rows, Kp a multiple of
// 4): raw int32 sums (kind 0), or scaled by xs [M] and ws [N], plus bias [N] if given, in fp32
// (kind 1) or bf16 (kind 2).
extern "C" void treeq_w8a8_gemm(const int8_t* x, int64_t M, int64_t Kp, const uint8_t* w, int64_t N, const float* xs,
                                const float* ws, const float* bias, void* y, int kind, int threads) {
    if (M == 0) return;
    int32_t* xsum = (int32_t*)scratch(0, sizeof(int32_t) * M);
    row_sums(x, M, Kp, xsum, threads);
    const Epilogue e{xs, ws, bias, xsum, y, N, kind};
    const int64_t blocks = (N + kLanes - 1) / kLanes;
    // Units of up to 4 blocks whose panel stays in L2; fewer when there are too few units to give
    // every thread two (small layers at decode), where the rows then split too.
    int64_t ub = kPanelBytes / (Kp * kLanes);
    ub = ub < 1 ? 1 : ub > kMaxBlocks ? kMaxBlocks : ub;
    while (ub > 1 && (blocks + ub - 1) / ub < 2 * threads) --ub;
    const int64_t units = (blocks + ub - 1) / ub;
    // Blocks of token rows whose codes stay in L2 while every unit's panel passes over them (one
    // pass over all rows per unit re-reads rows past L2 from L3 for every unit); smaller where the
    // units alone leave a thread idle.
    const int64_t row_groups = (M + kMaxRows - 1) / kMaxRows;
    int64_t mc = kRowBlockBytes / Kp / kMaxRows * kMaxRows;
    mc = mc < kMaxRows ? kMaxRows : mc;
    const int64_t split = (2 * threads + units - 1) / units;  // row blocks the threads need
    const int64_t mc_split = (row_groups + split - 1) / split * kMaxRows;
    mc = mc_split < mc ? mc_split : mc;
    const int64_t mblocks = (M + mc - 1) / mc;
    // Blocks of equal size: the static split gives each thread the same number of tasks, so a
    // short last block (M = 128 at K = 4096: 108 + 20 rows) would leave one thread idle.
    mc = (row_groups + mblocks - 1) / mblocks * kMaxRows;
    // Row-block-major tasks, statically split: a thread takes whole row blocks (or, with one,
    // consecutive units of it), and the threads' panels of one block come from memory once each.
#pragma omp parallel num_threads(threads)
    {
        int32_t* sums = (int32_t*)scratch(1, sizeof(int32_t) * (mc + kMaxRows) * ub * kLanes);
#pragma omp for schedule(static)
        for (int64_t t = 0; t < units * mblocks; ++t) {
            const int64_t u = t % units, m0 = (t / units) * mc;
            const int64_t rows_here = M - m0 < mc ? M - m0 : mc;
            const int64_t b0 = u * ub, nb = blocks - b0 < ub ? blocks - b0 : ub;
            const uint8_t* wu = w + b0 * Kp * kLanes;
            switch (nb) {
                case 1: rows<1>(x, rows_here, Kp, wu, m0, b0 * kLanes, e, sums); break;
                case 2: rows<2>(x, rows_here, Kp, wu, m0, b0 * kLanes, e, sums); break;
                case 3: rows<3>(x, rows_here, Kp, wu, m0, b0 * kLanes, e, sums); break;
                default: rows<4>(x, rows_here, Kp, wu, m0, b0 * kLanes, e, sums); break;
            }
        }
    }
}
