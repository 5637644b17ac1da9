// Output rows of a quantized weight as bf16, for the long-prompt GEMM of cpu_int4 (GPTQ-layout 4-bit)
// and cpu_int8 (8-bit per row), or as fp32 for cpu_int4_fp32's (fp32 models), on any x86 CPU (no AVX512 needed: the loops are written for the
// compiler to vectorize, and each function is cloned for AVX2 and for baseline x86-64, the loader
// picking the one the CPU runs).
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

// out for rows n0..n1 (multiples of 16). qweight: [K/8][N] words of 8 codes, input 8i + j in bits
// 4j..4j+3 of word i; qzeros: [G][N/8] the same way along outputs; scales: fp32 [G][N]; g_idx: each
// input's group. T: uint16_t (bf16, either layout) or float (layout 0).
template <typename T>
__attribute__((always_inline)) inline void gptq4_dequantize(const uint32_t* qweight, const uint32_t* qzeros,
                                                            const float* scales, const int32_t* g_idx, int64_t K,
                                                            int64_t N, int64_t n0, int64_t n1, T* out, int layout,
                                                            int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t nb = n0; nb < n1; nb += 16)
        for (int64_t k8 = 0; k8 < K / 8; ++k8) {
            // 8 inputs x 16 outputs, computed along outputs (contiguous in every operand), then
            // stored along inputs (layout 0) or as pairs of inputs along outputs (layout R).
            T v[8][16];
            for (int i = 0; i < 8; ++i) {
                const int64_t g = g_idx[8 * k8 + i];
                const uint32_t* w = qweight + k8 * N + nb;
                const uint32_t* z = qzeros + g * (N / 8) + nb / 8;
                const float* s = scales + g * N + nb;
                for (int j = 0; j < 16; ++j) {
                    const float code = float((w[j] >> (4 * i)) & 15u), zero = float((z[j / 8] >> (4 * (j % 8))) & 15u);
                    v[i][j] = stored<T>((code - zero) * s[j]);
                }
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

}  // namespace

extern "C" __attribute__((target_clones("avx2", "default"))) void treeq_gptq4_dequantize(
    const uint32_t* qweight, const uint32_t* qzeros, const float* scales, const int32_t* g_idx, int64_t K, int64_t N,
    int64_t n0, int64_t n1, uint16_t* out, int layout, int threads) {
    gptq4_dequantize(qweight, qzeros, scales, g_idx, K, N, n0, n1, out, layout, threads);
}

// The same rows in fp32, [n1 - n0][K]: exactly the reference kernel's fp32 weight, for fp32 models.
extern "C" __attribute__((target_clones("avx2", "default"))) void treeq_gptq4_dequantize_fp32(
    const uint32_t* qweight, const uint32_t* qzeros, const float* scales, const int32_t* g_idx, int64_t K, int64_t N,
    int64_t n0, int64_t n1, float* out, int threads) {
    gptq4_dequantize(qweight, qzeros, scales, g_idx, K, N, n0, n1, out, 0, threads);
}

// out [n1 - n0][K] for rows n0..n1 of an 8-bit weight with one scale per row, always in layout 0: a
// row's pairs scattered into layout R cost more (7-10 ms against 2.5 for a 4096 x 4096 weight on
// one Zen 5 core, strided reads waiting on memory) than oneDNN's repacking that layout R saves.
// w: int8 [N][K], code - 128; scales: fp32 [N]; zeros: [N].
extern "C" __attribute__((target_clones("avx2", "default"))) void treeq_int8_dequantize(
    const int8_t* w, const float* scales, const int32_t* zeros, int64_t K, int64_t n0, int64_t n1, uint16_t* out,
    int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = n0; n < n1; ++n) {
        const int8_t* src = w + n * K;
        const float s = scales[n];
        const int32_t shift = 128 - zeros[n];  // code - zero = w + 128 - zero, exact in fp32
        for (int64_t k = 0; k < K; ++k) out[(n - n0) * K + k] = bf16_nearest_even(float(src[k] + shift) * s);
    }
}
