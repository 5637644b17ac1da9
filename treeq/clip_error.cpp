// The clip search's weight error in one pass (clip_error.py says why and when it is used).
//
// For each candidate c and row r: sum over the row's columns of |w - d|^(2 + extra), where d is
// w quantized and dequantized by the candidate's scale and zero point (grid_steps.h). Every step
// up to |w - d| is the same fp32 operation, in the same order, as Grid.quantize and
// Grid.dequantize in numerics.py (no fused multiply-adds: built with -ffp-contract=off), so each
// element's error is bit for bit torch's. The power and the sum are not: |e|^extra is
// 2^(extra * log2|e|) by polynomials (within 1.5e-6 relative; torch's pow: 3.4e-6), and the sum runs
// in this loop's order.

#include <cmath>
#include <cstdint>
#include <cstring>

#include "grid_steps.h"

namespace {

using std::fma;  // the polynomials' steps, fused on purpose (-ffp-contract=off fuses nothing else)

inline float bits_to_float(uint32_t b) {
    float f;
    std::memcpy(&f, &b, 4);
    return f;
}

inline uint32_t float_to_bits(float f) {
    uint32_t b;
    std::memcpy(&b, &f, 4);
    return b;
}

// |e|^(2 + extra) for e >= 0 (0 for 0 and for subnormals, whose square is 0 in fp32 anyway).
inline float power(float e, float extra) {
    const uint32_t b = float_to_bits(e);
    int32_t k = int32_t((b >> 23) & 0xff) - 127;
    float m = bits_to_float((b & 0x7fffff) | 0x3f800000);  // e = m * 2^k, m in [1, 2)
    const bool high = m > 1.41421356f;                      // m in [sqrt(1/2), sqrt(2)) from here
    m = high ? m * 0.5f : m;
    k = high ? k + 1 : k;
    // ln m = 2 atanh(s), s = (m - 1) / (m + 1), |s| <= 0.1716: the series to s^9 is within 3e-10.
    const float s = (m - 1.0f) / (m + 1.0f), s2 = s * s;
    const float ln_m = 2.0f * s * fma(s2, fma(s2, fma(s2, fma(s2, 1.0f / 9, 1.0f / 7), 1.0f / 5), 1.0f / 3), 1.0f);
    const float y = extra * fma(ln_m, 1.44269504f, float(k));  // extra * log2 e
    // 2^y = 2^n * exp(f ln 2), n = nearest integer, |f| <= 1/2: Taylor to the 7th power, within 2e-8.
    const float n = std::nearbyint(y), t = (y - n) * 0.693147181f;
    float p = fma(t, 1.0f / 5040, 1.0f / 720);
    p = fma(fma(fma(fma(p, t, 1.0f / 120), t, 1.0f / 24), t, 1.0f / 6), t, 0.5f);
    p = fma(fma(p, t, 1.0f), t, 1.0f);
    const float scaled = bits_to_float(float_to_bits(p) + (uint32_t(int32_t(n)) << 23));
    return e * e * scaled;
}

}  // namespace

extern "C" void treeq_clip_errors(const float* w, int64_t rows, int64_t cols, const float* scale, const float* zero,
                                  int64_t candidates, float offset, float lo, float hi, float extra, float* err,
                                  int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < candidates * rows; ++i) {
        const float* row = w + (i % rows) * cols;
        const float s = scale[i], z = zero[i];
        float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
        for (int64_t j = 0; j < cols; ++j) {
            const float d = grid_value(grid_code(row[j], s, z, offset, lo, hi), s, z, offset);
            acc += power(std::fabs(row[j] - d), extra);
        }
        err[i] = acc;
    }
}

extern "C" int treeq_clip_errors_supported() {
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
