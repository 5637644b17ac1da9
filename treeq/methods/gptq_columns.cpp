// GPTQ's column loop over one run of a block's columns (gptq_columns.py says when it is used).
//
// Rows are independent in GPTQ: a column's error only moves weights of its own row. So each row
// runs the whole run of columns on its own (in L1, rows split among threads), where torch ran a
// dozen small ops per column over all rows. Every value is the same fp32 operation, in the same
// order, as gptq.py's torch loop: Grid.quantize / Grid.dequantize, the error divided by the
// pivot, and the update w - (e * u) (a product and a difference, never fused: built with
// -ffp-contract=off). The result is that loop's bit for bit.

#include <cstdint>

#include "../grid_steps.h"

extern "C" void treeq_gptq_columns(float* w1, int64_t rows, int64_t width, const float* u1, int64_t ldu,
                                   int64_t begin, int64_t end, const int64_t* group, const float* scales,
                                   const float* zeros, float offset, float lo, float hi, uint8_t* codes,
                                   int64_t ld_codes, float* err1, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        float* w = w1 + r * width;
        for (int64_t c = begin; c < end; ++c) {
            const float s = scales[group[c] * rows + r], z = zeros[group[c] * rows + r];
            const float q = grid_code(w[c], s, z, offset, lo, hi);
            codes[r * ld_codes + c] = uint8_t(q);
            const float e = (w[c] - grid_value(q, s, z, offset)) / u1[c * ldu + c];
            err1[r * width + c] = e;
            const float* u = u1 + c * ldu;
#pragma omp simd
            for (int64_t t = c; t < width; ++t) w[t] = w[t] - e * u[t];
        }
    }
}

extern "C" int treeq_gptq_columns_supported() {
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
