// Output rows of a GPTQ-layout 4-bit weight as bf16, for cpu_int4's long prompts on any x86 CPU
// (no AVX512 needed: the loops are written for the compiler to vectorize, and the function is
// cloned for AVX2 and for baseline x86-64, the loader picking the one the CPU runs).
//
// Each weight is (code - zero) * scale in fp32, rounded once to bf16 (to nearest, ties to even):
// the reference kernel's dequantization followed by its cast to bf16, bit for bit.
#include <stdint.h>
#include <string.h>

namespace {

inline uint16_t bf16_nearest_even(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);  // finite inputs only
}

}  // namespace

// out[n - n0][k] for n in [n0, n1) (multiples of 16). qweight: [K/8][N] words of 8 codes, input
// 8i + j in bits 4j..4j+3 of word i; qzeros: [G][N/8] the same way along outputs; scales: fp32
// [G][N]; g_idx: each input's group.
extern "C" __attribute__((target_clones("avx2", "default"))) void treeq_gptq4_dequantize(
    const uint32_t* qweight, const uint32_t* qzeros, const float* scales, const int32_t* g_idx, int64_t K, int64_t N,
    int64_t n0, int64_t n1, uint16_t* out, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t nb = n0; nb < n1; nb += 16)
        for (int64_t k8 = 0; k8 < K / 8; ++k8) {
            // 8 inputs x 16 outputs, computed along outputs (contiguous in every operand), then
            // stored along inputs.
            uint16_t v[8][16];
            for (int i = 0; i < 8; ++i) {
                const int64_t g = g_idx[8 * k8 + i];
                const uint32_t* w = qweight + k8 * N + nb;
                const uint32_t* z = qzeros + g * (N / 8) + nb / 8;
                const float* s = scales + g * N + nb;
                for (int j = 0; j < 16; ++j) {
                    const float code = float((w[j] >> (4 * i)) & 15u), zero = float((z[j / 8] >> (4 * (j % 8))) & 15u);
                    v[i][j] = bf16_nearest_even((code - zero) * s[j]);
                }
            }
            for (int j = 0; j < 16; ++j)
                for (int i = 0; i < 8; ++i) out[(nb + j - n0) * K + 8 * k8 + i] = v[i][j];
        }
}
