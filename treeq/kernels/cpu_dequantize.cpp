// Output rows of a quantized weight as bf16, for the long-prompt GEMM of cpu_int4 (GPTQ-layout 4-bit)
// and cpu_int8 (8-bit per row), or as fp32 for cpu_int4_fp32's (fp32 models), on any x86 CPU (no
// AVX512 needed: the loops are written for the compiler to vectorize, in GCC's vector extensions
// where it would not, and the work of each block of rows is cloned for AVX2 and for baseline
// x86-64, the loader picking the one the CPU runs).
//
// Each weight is (code - zero) * scale in fp32, rounded once to bf16 (to nearest, ties to even) or
// kept in fp32: the reference kernel's dequantization followed by its cast to bf16, bit for bit, or
// without it.
//
// layout 0 writes rows [n1 - n0][K]; layout R (32 or 64) oneDNN's blocked weight (AB16b<R>a2b: per R
// rows x 32 inputs, 16 pairs of inputs for each of the R rows), which its GEMM reads without
// repacking it first (n0, n1 multiples of R, K of 32 there; see blocked_gemm.py).
#include <stdint.h>
#include <string.h>

namespace {

inline uint16_t bf16_nearest_even(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);  // finite inputs only
}

// Where layout R keeps the pair of inputs k, k + 1 (k even) of row n (counted from n0), as 32-bit
// words: the next row's pair is the next word.
inline uint32_t* pair_slot(uint16_t* out, int64_t n, int64_t k, int64_t K, int64_t R) {
    return (uint32_t*)out + ((n / R) * (K / 32) + k / 32) * 16 * R + (k % 32) / 2 * R + n % R;
}

}  // namespace

namespace {

// A weight (code - zero) * scale computed in fp32, as stored: rounded once to bf16, or kept in fp32.
template <typename T>
inline T stored(float f);
template <>
inline uint16_t stored<uint16_t>(float f) { return bf16_nearest_even(f); }
template <>
inline float stored<float>(float f) { return f; }

// 8 lanes in GCC's vector extensions, which each clone below compiles for its own instructions (the
// compiler left the same loop written in scalars unvectorized, judging it unprofitable).
typedef uint32_t U8 __attribute__((vector_size(32)));
typedef float F8 __attribute__((vector_size(32)));
typedef uint16_t H8 __attribute__((vector_size(16)));

// GPTQ's words: 32 / B codes of B bits each (B = 4 or 8), the first in the lowest bits.
template <int B>
constexpr uint32_t kMask = (1u << B) - 1;

// The code at position i of a row of words (stride: between words along the rows).
template <int B>
inline uint32_t code_at(const uint32_t* words, int64_t stride, int64_t i) {
    return (words[i / (32 / B) * stride] >> (B * (i % (32 / B)))) & kMask<B>;
}

// The codes of inputs 8 k8 .. 8 k8 + 7 of one output (w: its word for inputs from 8 k8 on; N: the
// stride between words along the inputs): all 8 codes of one 4-bit word, or 4 of each of two 8-bit words.
template <int B>
inline U8 codes8(const uint32_t* w, int64_t N) {
    if constexpr (B == 4) {
        return (U8{} + w[0]) >> U8{0, 4, 8, 12, 16, 20, 24, 28} & kMask<4>;
    } else {
        const uint32_t a = w[0], b = w[N];
        return U8{a, a, a, a, b, b, b, b} >> U8{0, 8, 16, 24, 0, 8, 16, 24} & kMask<8>;
    }
}

// 8 weights stored as bf16 (to nearest, ties to even: bf16_nearest_even lane by lane) or fp32.
inline void store8(uint16_t* out, F8 f) {
    U8 u;
    memcpy(&u, &f, sizeof u);
    const H8 h = __builtin_convertvector((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16, H8);
    memcpy(out, &h, sizeof h);
}
inline void store8(float* out, F8 f) { memcpy(out, &f, sizeof f); }

// The zero points (as floats) and scales of one group for 16 outputs, reloaded only when the group
// changes: unpacked per input, they kept the compiler from vectorizing the loops below.
template <int B>
struct GroupParams {
    int64_t group = -1;
    float zero[16], scale[16];
    void load(const uint32_t* qzeros, const float* scales, int64_t N, int64_t nb, int64_t g) {
        if (g == group) return;
        group = g;
        for (int j = 0; j < 16; ++j) {
            zero[j] = float(code_at<B>(qzeros + g * (N / (32 / B)), 1, nb + j));
            scale[j] = scales[g * N + nb + j];
        }
    }
};

// Output rows nb..nb + 15 of out (rows n0..n1, multiples of 16) of a B-bit weight. qweight:
// [K B/32][N] words of 32 / B codes, input (32 / B) i + j in bits B j.. of word i; qzeros:
// [G][N B/32] the same way along outputs; scales: fp32 [G][N]; g_idx: each input's group. K is a
// multiple of 8. T: uint16_t (bf16, either layout) or float (layout 0).
template <int B, typename T>
__attribute__((always_inline)) inline void gptq_block(const uint32_t* qweight, const uint32_t* qzeros,
                                                      const float* scales, const int32_t* g_idx, int64_t K,
                                                      int64_t N, int64_t n0, int64_t nb, T* out, int layout) {
    GroupParams<B> p;
    for (int64_t k8 = 0; k8 < K / 8; ++k8) {
        const uint32_t* w = qweight + k8 * (B * 8 / 32) * N + nb;  // the words of inputs 8 k8 on
        const int32_t* gi = g_idx + 8 * k8;
        bool one_group = true;
        for (int i = 1; i < 8; ++i) one_group &= gi[i] == gi[0];
        if (layout == 0 && one_group) {
            // Rows: each output's 8 inputs, along the inputs (the stored order).
            p.load(qzeros, scales, N, nb, gi[0]);
            for (int j = 0; j < 16; ++j) {
                const F8 codes = __builtin_convertvector(codes8<B>(w + j, N), F8);
                store8(out + (nb + j - n0) * K + 8 * k8, (codes - p.zero[j]) * p.scale[j]);
            }
            continue;
        }
        // 8 inputs x 16 outputs, computed along outputs, then stored along inputs (layout 0: the
        // inputs of several groups, as act-order's) or as pairs of inputs along outputs (layout R).
        T v[8][16];
        for (int i = 0; i < 8; ++i) {
            p.load(qzeros, scales, N, nb, gi[i]);
            for (int j = 0; j < 16; ++j) v[i][j] = stored<T>((float(code_at<B>(w + j, N, i)) - p.zero[j]) * p.scale[j]);
        }
        if (layout == 0) {
            for (int j = 0; j < 16; ++j)
                for (int i = 0; i < 8; ++i) out[(nb + j - n0) * K + 8 * k8 + i] = v[i][j];
            continue;
        }
        if constexpr (sizeof(T) == 2)
            for (int i = 0; i < 8; i += 2) {
                uint32_t* dst = pair_slot(out, nb - n0, 8 * k8 + i, K, layout);
                for (int j = 0; j < 16; ++j) dst[j] = v[i][j] | uint32_t(v[i + 1][j]) << 16;
            }
    }
}

// The per-block and per-row work, each cloned for AVX2 and for baseline x86-64. The OpenMP loops
// stay in the callers: GCC compiles a parallel loop's body once, for the baseline, whatever clones
// the function around it has, so inside the clones it ran on SSE2 only.
__attribute__((target_clones("avx2", "default"))) void gptq4_block_bf16(
    const uint32_t* qweight, const uint32_t* qzeros, const float* scales, const int32_t* g_idx, int64_t K, int64_t N,
    int64_t n0, int64_t nb, uint16_t* out, int layout) {
    gptq_block<4>(qweight, qzeros, scales, g_idx, K, N, n0, nb, out, layout);
}

__attribute__((target_clones("avx2", "default"))) void gptq_block_fp32(
    const uint32_t* qweight, const uint32_t* qzeros, const float* scales, const int32_t* g_idx, int64_t K, int64_t N,
    int64_t n0, int64_t nb, float* out, int bits) {
    if (bits == 8) gptq_block<8>(qweight, qzeros, scales, g_idx, K, N, n0, nb, out, 0);
    else gptq_block<4>(qweight, qzeros, scales, g_idx, K, N, n0, nb, out, 0);
}

__attribute__((target_clones("avx2", "default"))) void int8_row(const int8_t* src, float scale, int32_t shift,
                                                                int64_t K, uint16_t* out) {
    for (int64_t k = 0; k < K; ++k) out[k] = bf16_nearest_even(float(src[k] + shift) * scale);
}

}  // namespace

// Rows n0..n1 (multiples of 16) of a 4-bit GPTQ-layout weight in bf16, in layout 0 or R (gptq_block).
extern "C" void treeq_gptq4_dequantize(const uint32_t* qweight, const uint32_t* qzeros, const float* scales,
                                       const int32_t* g_idx, int64_t K, int64_t N, int64_t n0, int64_t n1,
                                       uint16_t* out, int layout, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t nb = n0; nb < n1; nb += 16) gptq4_block_bf16(qweight, qzeros, scales, g_idx, K, N, n0, nb, out, layout);
}

// Rows n0..n1 of a 4- or 8-bit (bits) GPTQ-layout weight in fp32, [n1 - n0][K]: exactly the reference
// kernel's fp32 weight, for fp32 models.
extern "C" void treeq_gptq_dequantize_fp32(const uint32_t* qweight, const uint32_t* qzeros, const float* scales,
                                           const int32_t* g_idx, int64_t K, int64_t N, int64_t n0, int64_t n1,
                                           float* out, int bits, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t nb = n0; nb < n1; nb += 16) gptq_block_fp32(qweight, qzeros, scales, g_idx, K, N, n0, nb, out, bits);
}

// out [n1 - n0][K] for rows n0..n1 of an 8-bit weight with one scale per row, always in layout 0: a
// row's pairs scattered into layout R cost more (7-10 ms against 2.5 for a 4096 x 4096 weight on
// one Zen 5 core, strided reads waiting on memory) than oneDNN's repacking that layout R saves.
// w: int8 [N][K], code - 128; scales: fp32 [N]; zeros: [N].
extern "C" void treeq_int8_dequantize(const int8_t* w, const float* scales, const int32_t* zeros, int64_t K,
                                      int64_t n0, int64_t n1, uint16_t* out, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = n0; n < n1; ++n)  // code - zero = w + 128 - zero, exact in fp32
        int8_row(w + n * K, scales[n], 128 - zeros[n], K, out + (n - n0) * K);
}
