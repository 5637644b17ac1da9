// LUT-GEMM on the CPU for binary-coding quantized weights (treeq/bcq.py): y = x W^T with
// W[n, k] = offset[g, n] + sum_i alpha[i, g, n] * b[i, n, k], b in {-1, +1}, g = k / group_size.
//
// Idea (Park et al., LUT-GEMM): for each slice of 8 inputs, the 256 sums +-x0 +-x1 ... +-x7 are
// computed once per token; a byte of one bit-plane (one bit per input of the slice, 1 = +1) is then
// the index of the signed sum it stands for, so sum_k b[i, n, k] x[k] over a group is one table
// look-up per 8 inputs instead of 8 multiply-adds, and the weight is never expanded. The alphas
// scale each plane's sum once per group; the offset multiplies the group's plain sum of inputs.
//
// Layouts (built by cpu_lut_bcq.py): planes [N/16][K/8][q][16] bytes, so 16 outputs' bytes for one
// slice and plane are one 16-byte load and one 16-lane gather; alphas [N/16][groups][q][16] and
// offsets [N/16][groups][16] fp32. Tables [tokens][K/8][256] fp32, built for a block of tokens at a
// time. Every sum is in fp32; only the order differs from x @ W^T.
//
// Two paths with the same layouts: AVX512 (16-lane gathers) and AVX2 (two 8-lane gathers), chosen
// by the caller; functions carry their own target attributes so the library loads on AVX2-only
// CPUs.
//
// treeq_bcq_dequantize writes rows of the fp32 weight itself from the same layouts, bit for bit
// treeq.bcq.dequantize's, for the dense path of long prompts (cpu_lut_bcq.py).

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

constexpr int kLanes = 16;          // outputs per block
constexpr int kSlice = 8;           // inputs per table
constexpr int kTable = 256;         // entries per table
constexpr int kHalves = 32;         // entries of its two 16-entry halves
constexpr int kTokenBlock = 8;      // tokens whose tables are built together
constexpr int kTokenStep = 4;       // tokens the AVX512 path looks up together
constexpr int64_t kChunkFloats = 262144;  // table entries (1 MiB, an L2) a chunk of groups spans, over its tokens

// Per token t and slice s of 8 inputs, the halves lo[e] = sum_{j<4} (bit j of e ? +x : -x)[8s + j]
// and hi[e] the same over inputs 8s + 4..7. With `full`, tables[t][s][16h + l] = lo[l] + hi[h]: the
// 256 signed sums (bit j of the index: +-x[8s + j]); without, halves[t][s] = lo then hi (32 floats).
// sums[t][g] = the plain sum of token t's inputs in group g (the all-plus entry, lo[15] + hi[15]).
void build_tables(const float* x, int64_t tokens, int64_t k, int64_t group_size, bool full, float* tables,
                  float* sums, int threads) {
  const int64_t slices = k / kSlice, groups = k / group_size, per_group = group_size / kSlice;
  const int64_t stride = full ? kTable : kHalves;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t ts = 0; ts < tokens * slices; ++ts) {
    const float* v = x + ts * kSlice;  // token ts / slices, slice ts % slices: contiguous in x
    float* table = tables + ts * stride;
    float halves[kHalves];
    float* lo = full ? halves : table;
    float* hi = lo + 16;
    for (int e = 0; e < 16; ++e) {
      lo[e] = ((e & 1) ? v[0] : -v[0]) + ((e & 2) ? v[1] : -v[1]) + ((e & 4) ? v[2] : -v[2]) +
              ((e & 8) ? v[3] : -v[3]);
      hi[e] = ((e & 1) ? v[4] : -v[4]) + ((e & 2) ? v[5] : -v[5]) + ((e & 4) ? v[6] : -v[6]) +
              ((e & 8) ? v[7] : -v[7]);
    }
    if (full)
      for (int h = 0; h < 16; ++h)
        for (int l = 0; l < 16; ++l) table[h * 16 + l] = lo[l] + hi[h];
  }
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t g = 0; g < groups; ++g) {
      float s = 0.f;
      for (int64_t j = 0; j < per_group; ++j) {
        const float* table = tables + (t * slices + g * per_group + j) * stride;
        s += full ? table[kTable - 1] : table[15] + table[31];
      }
      sums[t * groups + g] = s;
    }
}

struct Problem {
  const uint8_t* planes;
  const float* alphas;
  const float* offsets;
  int64_t n, k, q, group_size;

  int64_t slices() const { return k / kSlice; }
  int64_t groups() const { return k / group_size; }
  int64_t per_group() const { return group_size / kSlice; }
  // Output block b's planes, alphas and offsets (the layouts above).
  const uint8_t* block_planes(int64_t b) const { return planes + b * slices() * q * kLanes; }
  const float* block_alphas(int64_t b) const { return alphas + b * groups() * q * kLanes; }
  const float* block_offsets(int64_t b) const { return offsets + b * groups() * kLanes; }
};

// Adds groups [g0, g1) of output block `block` to y for each token (g0 == 0: y is overwritten).
// AVX512 looks a byte b up as the sum of the table's two 16-entry halves, lo[b & 15] + hi[b >> 4]
// (build_tables forms T[b] from exactly these, so the value is the same), each half one register
// and each look-up a 16-lane vpermps: 16-lane gathers from the 256 entries ran no faster than bf16
// F.linear on a Zen 5 (4096 x 4096, one token).
// Q (the planes) and T (tokens taken together, up to kTokenStep) are template arguments so the
// per-plane sums stay in registers; a plane's byte becomes its two index vectors once for T tokens.
template <int Q, int T>
__attribute__((target("avx512f"))) void tokens_avx512(const Problem& p, int64_t block, int64_t g0, int64_t g1,
                                                      const float* halves, const float* sums, int64_t t0,
                                                      float* y) {
  const int64_t slices = p.slices(), groups = p.groups(), per_group = p.per_group();
  const uint8_t* bytes = p.block_planes(block);
  const float* alpha = p.block_alphas(block);
  const float* offset = p.block_offsets(block);
  __m512 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = g0 ? _mm512_loadu_ps(y + (t0 + t) * p.n + block * kLanes) : _mm512_setzero_ps();
  for (int64_t g = g0; g < g1; ++g) {
    const __m512 off = _mm512_loadu_ps(offset + g * kLanes);
    __m512 s[T][Q];
    for (int t = 0; t < T; ++t) {
      acc[t] = _mm512_fmadd_ps(off, _mm512_set1_ps(sums[(t0 + t) * groups + g]), acc[t]);
      for (int i = 0; i < Q; ++i) s[t][i] = _mm512_setzero_ps();
    }
    for (int64_t j = g * per_group; j < (g + 1) * per_group; ++j) {
      for (int i = 0; i < Q; ++i) {
        const __m512i lo = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(bytes + (j * Q + i) * kLanes)));
        const __m512i hi = _mm512_srli_epi32(lo, 4);  // vpermps reads only the low 4 bits of `lo`
        for (int t = 0; t < T; ++t) {
          const float* half = halves + ((t0 + t) * slices + j) * kHalves;
          const __m512 v = _mm512_add_ps(_mm512_permutexvar_ps(lo, _mm512_loadu_ps(half)),
                                         _mm512_permutexvar_ps(hi, _mm512_loadu_ps(half + 16)));
          s[t][i] = _mm512_add_ps(s[t][i], v);
        }
      }
    }
    for (int t = 0; t < T; ++t)
      for (int i = 0; i < Q; ++i) acc[t] = _mm512_fmadd_ps(_mm512_loadu_ps(alpha + (g * Q + i) * kLanes), s[t][i], acc[t]);
  }
  for (int t = 0; t < T; ++t) _mm512_storeu_ps(y + (t0 + t) * p.n + block * kLanes, acc[t]);
}

template <int Q>
void block_avx512(const Problem& p, int64_t block, int64_t g0, int64_t g1, const float* halves, const float* sums,
                  int64_t tokens, float* y) {
  int64_t t0 = 0;
  for (; t0 + kTokenStep <= tokens; t0 += kTokenStep)
    tokens_avx512<Q, kTokenStep>(p, block, g0, g1, halves, sums, t0, y);
  switch (tokens - t0) {
    case 3: tokens_avx512<Q, 3>(p, block, g0, g1, halves, sums, t0, y); break;
    case 2: tokens_avx512<Q, 2>(p, block, g0, g1, halves, sums, t0, y); break;
    case 1: tokens_avx512<Q, 1>(p, block, g0, g1, halves, sums, t0, y); break;
  }
}

__attribute__((target("avx2,fma"))) void block_avx2(const Problem& p, int64_t block, int64_t g0, int64_t g1,
                                                    const float* tables, const float* sums, int64_t tokens,
                                                    float* y) {
  const int64_t slices = p.slices(), groups = p.groups(), per_group = p.per_group();
  const uint8_t* bytes = p.block_planes(block);
  const float* alpha = p.block_alphas(block);
  const float* offset = p.block_offsets(block);
  for (int64_t t = 0; t < tokens; ++t) {
    const float* tab = tables + t * slices * kTable;
    float* out = y + t * p.n + block * kLanes;
    __m256 acc_lo = g0 ? _mm256_loadu_ps(out) : _mm256_setzero_ps();
    __m256 acc_hi = g0 ? _mm256_loadu_ps(out + 8) : _mm256_setzero_ps();
    for (int64_t g = g0; g < g1; ++g) {
      const __m256 sum = _mm256_set1_ps(sums[t * groups + g]);
      acc_lo = _mm256_fmadd_ps(_mm256_loadu_ps(offset + g * kLanes), sum, acc_lo);
      acc_hi = _mm256_fmadd_ps(_mm256_loadu_ps(offset + g * kLanes + 8), sum, acc_hi);
      for (int64_t i = 0; i < p.q; ++i) {
        __m256 s_lo = _mm256_setzero_ps(), s_hi = _mm256_setzero_ps();
        for (int64_t j = 0; j < per_group; ++j) {
          const int64_t s = g * per_group + j;
          const uint8_t* b = bytes + (s * p.q + i) * kLanes;
          __m256i i_lo = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)b));
          __m256i i_hi = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(b + 8)));
          s_lo = _mm256_add_ps(s_lo, _mm256_i32gather_ps(tab + s * kTable, i_lo, 4));
          s_hi = _mm256_add_ps(s_hi, _mm256_i32gather_ps(tab + s * kTable, i_hi, 4));
        }
        const float* a = alpha + (g * p.q + i) * kLanes;
        acc_lo = _mm256_fmadd_ps(_mm256_loadu_ps(a), s_lo, acc_lo);
        acc_hi = _mm256_fmadd_ps(_mm256_loadu_ps(a + 8), s_hi, acc_hi);
      }
    }
    _mm256_storeu_ps(out, acc_lo);
    _mm256_storeu_ps(out + 8, acc_hi);
  }
}

// Rows of output block b as fp32 at `out` (row-major, k per row), bit for bit treeq.bcq.dequantize's:
// each weight is ((offset + s_0 alpha_0) + s_1 alpha_1) + ..., s_i = +-1 from plane i's bit, the fp32
// sums bcq.combine forms a level with, in its order (the sign is a select: alpha * -1 is -alpha
// exactly). Computed along outputs, where planes, alphas and offsets are contiguous, so the compiler
// vectorizes it (AVX2 here, no intrinsics); stored along inputs, 8 per row and slice.
void dequantize_block(const Problem& p, int64_t b, float* out) {
  const int64_t per_group = p.per_group();
  const uint8_t* bytes = p.block_planes(b);
  const float* alpha = p.block_alphas(b);
  const float* offset = p.block_offsets(b);
  for (int64_t s = 0; s < p.slices(); ++s) {
    const int64_t g = s / per_group;
    float v[kSlice][kLanes];
    for (int e = 0; e < kSlice; ++e) {
      for (int l = 0; l < kLanes; ++l) v[e][l] = offset[g * kLanes + l];
      for (int64_t i = 0; i < p.q; ++i) {
        const uint8_t* bits = bytes + (s * p.q + i) * kLanes;
        const float* a = alpha + (g * p.q + i) * kLanes;
        for (int l = 0; l < kLanes; ++l) v[e][l] += ((bits[l] >> e) & 1) ? a[l] : -a[l];
      }
    }
    for (int l = 0; l < kLanes; ++l)
      for (int e = 0; e < kSlice; ++e) out[l * p.k + s * kSlice + e] = v[e][l];
  }
}

}  // namespace

extern "C" {

// 2: AVX512F and AVX2, 1: AVX2 only, 0: neither.
int treeq_bcq_isa() {
  if (__builtin_cpu_supports("avx512f")) return 2;
  return (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) ? 1 : 0;
}

// x [m, k] fp32 row-major; y [m, n] fp32; q in 2..4. avx512: 1 for the AVX512 path, 0 for AVX2.
void treeq_bcq_lut_matmul(const float* x, int64_t m, int64_t k, const uint8_t* planes, const float* alphas,
                          const float* offsets, int64_t n, int64_t q, int64_t group_size, float* y, int threads,
                          int avx512) {
  const Problem p{planes, alphas, offsets, n, k, q, group_size};
  const int64_t slices = k / kSlice, groups = k / group_size, blocks = n / kLanes;
  const int64_t stride = avx512 ? kHalves : kTable;
  std::vector<float> tables(kTokenBlock * slices * stride), sums(kTokenBlock * groups);
  for (int64_t t0 = 0; t0 < m; t0 += kTokenBlock) {
    const int64_t tokens = std::min<int64_t>(m - t0, kTokenBlock);
    build_tables(x + t0 * k, tokens, k, group_size, !avx512, tables.data(), sums.data(), threads);
    // Groups in chunks whose tables (every token's) fit in L2, every output block per chunk. Chunks
    // sized for L1 (32 KiB) read each block's bit-planes in runs of a few KiB, jumping between
    // blocks, which the prefetchers followed badly; with whole rows per chunk at one to 16 tokens
    // the bytes stream in order (figures: bench/results/lut_gemm.md).
    const int64_t chunk = std::max<int64_t>(1, kChunkFloats / (tokens * (group_size / kSlice) * stride));
#pragma omp parallel num_threads(threads)
    for (int64_t g0 = 0; g0 < groups; g0 += chunk) {
      const int64_t g1 = std::min(groups, g0 + chunk);
      // Static schedule: a thread owns the same blocks in every chunk, so chunks need no barrier.
#pragma omp for schedule(static) nowait
      for (int64_t b = 0; b < blocks; ++b) {
        if (avx512 && q == 2)
          block_avx512<2>(p, b, g0, g1, tables.data(), sums.data(), tokens, y + t0 * n);
        else if (avx512 && q == 3)
          block_avx512<3>(p, b, g0, g1, tables.data(), sums.data(), tokens, y + t0 * n);
        else if (avx512)
          block_avx512<4>(p, b, g0, g1, tables.data(), sums.data(), tokens, y + t0 * n);
        else
          block_avx2(p, b, g0, g1, tables.data(), sums.data(), tokens, y + t0 * n);
      }
    }
  }
}

// out [hi - lo][k] fp32: rows lo..hi (multiples of 16) of the weight, from the layouts above.
void treeq_bcq_dequantize(const uint8_t* planes, const float* alphas, const float* offsets, int64_t n, int64_t k,
                          int64_t q, int64_t group_size, int64_t lo, int64_t hi, float* out, int threads) {
  const Problem p{planes, alphas, offsets, n, k, q, group_size};
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t b = lo / kLanes; b < hi / kLanes; ++b) dequantize_block(p, b, out + (b * kLanes - lo) * k);
}
}
