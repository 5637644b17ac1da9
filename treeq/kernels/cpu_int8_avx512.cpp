// 8-bit weights in rows times bf16 activations on x86 CPUs with AVX512-BF16 (and AMX-BF16 when
// present): cpu_int8's signed rows [N][K] (code - 128) with one fp32 scale and zero point per row,
// each weight dequantized as the reference kernel does ((w + 128 - zero) * scale in fp32, rounded
// once to bf16) and the sums kept in fp32. The panel paths (avx512_tiles.h) take these rows as a
// Source; the AMX rows path and the vector rows stream path, for a few tokens, are this file's own.
#include "avx512_tiles.h"

namespace {

// AMX rows path (8-bit rows, a few tokens): the panel paths transpose every weight into the tiles'
// B layout, per call. Here the weights' rows are the A operand as they are (16 outputs x 32 inputs
// per tile) and the inputs, transposed once per call, the B operand (16 pairs of inputs x up to 16
// token rows), so each block's sums are 16 outputs x its tokens, transposed into y at the end
// (rows_blocks below).
constexpr int64_t kRowsAhead = 256;  // bytes of a row between its prefetch and its load

// 8-bit weights as signed rows [N][K] (cpu_int8's: code - 128), each row's fp32 scale and zero
// point: (w + 128 - zero) * scale in fp32, rounded once to bf16, as the reference kernel's weight.
struct Int8Rows {
    const int8_t* w;
    const float* scales;
    const int32_t* zeros;
    int64_t blocks, K;
    Item item(int64_t t, int64_t split) const { return place_of(t, split, blocks); }
    // Output n's inputs of tile i (32) as bf16, in input order.
    __m512i row(int64_t n, int64_t i) const {
        // Each half widened straight from memory: no 32-byte load and extract.
        const __m128i* q = (const __m128i*)(w + n * K + i * kTileK);
        __m512i a = _mm512_cvtepi8_epi32(_mm_loadu_si128(q)), b = _mm512_cvtepi8_epi32(_mm_loadu_si128(q + 1));
        if (zeros[n] != 128) {  // a symmetric row (zero point 128) needs no shift
            const __m512i shift = _mm512_set1_epi32(128 - zeros[n]);
            a = _mm512_add_epi32(a, shift);
            b = _mm512_add_epi32(b, shift);
        }
        const __m512 scale = _mm512_set1_ps(scales[n]);
        const __m512 lo = _mm512_mul_ps(_mm512_cvtepi32_ps(a), scale);
        const __m512 hi = _mm512_mul_ps(_mm512_cvtepi32_ps(b), scale);
        return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
    }
    // Output n's inputs of tile i as row() gives them, asking for the row's next bytes: a unit's 64
    // rows read side by side are more streams than the hardware prefetcher follows.
    __m512i row_ahead(int64_t n, int64_t i) const {
        if (i % 2 == 0) _mm_prefetch((const char*)(w + n * K + i * kTileK) + kRowsAhead, _MM_HINT_T0);
        return row(n, i);
    }
    // Panel tiles a block at a time (16 row streams; the 64 of a tile of each block in turn ran
    // 3-8% slower from 33 to 256 tokens). weight_rows: as A tiles (rows as they are), else as B
    // tiles (transposed).
    template <int NB>
    void fill(const Item& it, int64_t k0, int64_t k1, uint16_t* panel, bool weight_rows) const {
        for (int b = 0; b < NB; ++b)
            for (int64_t i = k0; i < k1; ++i) {
                const int64_t n0 = (it.b + b) * kTileN;
                uint16_t* dst = panel + ((i - k0) * NB + b) * kTileN * kTileK;
                __m512i rows[16];  // output n0 + r's 32 inputs (16 pairs)
                for (int r = 0; r < kTileN; ++r) rows[r] = row_ahead(n0 + r, i);
                if (!weight_rows) transpose16(rows);  // row p: pair p of the 16 outputs
                for (int r = 0; r < kTileN; ++r) _mm512_store_si512(dst + r * kTileK, rows[r]);
            }
    }
};

// A block's 16 rows of input tile i into a, as bf16.
inline void rows_convert(const Int8Rows& src, int64_t n0, int64_t i, uint16_t* a) {
    for (int r = 0; r < kTileN; ++r) _mm512_store_si512(a + r * kTileK, src.row_ahead(n0 + r, i));
}

// A work item's nb blocks (outputs n0..) for M <= 32 tokens, a block at a time over all inputs: its
// 16 rows are then the only streams read from memory, which the hardware prefetcher follows (a
// unit's 64 rows side by side left most reads waiting on memory: 8-16 tokens ran 1.4x as fast).
// Tile 0 (and 7 from 17 tokens) the inputs, 1 the block's weights, 2 (and 3) its sums; a: two tiles
// of scratch, used in turns.
void rows_blocks(const Int8Rows& src, const uint16_t* xt, int64_t tiles, int64_t n0, int64_t nb, int64_t M,
                 uint16_t* y, int64_t N, uint16_t (*a)[kTileN * kTileK]) {
    const bool two = M > 16;
    for (int64_t b = 0; b < nb; ++b) {
        const int64_t nb0 = n0 + b * kTileN;
        _tile_zero(2);
        if (two) _tile_zero(3);
        for (int64_t i = 0; i < tiles; ++i) {
            _tile_loadd(0, xt + i * 512, 64);
            if (two) _tile_loadd(7, xt + (tiles + i) * 512, 64);
            rows_convert(src, nb0, i, a[i & 1]);
            _tile_loadd(1, a[i & 1], 64);
            _tile_dpbf16ps(2, 1, 0);
            if (two) _tile_dpbf16ps(3, 1, 7);
        }
        rows_store<0>(two ? 16 : M, y + nb0, N);
        if (two) rows_store<1>(M - 16, y + 16 * N + nb0, N);
    }
}

void rows_amx_matmul(const uint16_t* x, int64_t M, int64_t K, int64_t N, uint16_t* y, int threads,
                     const Int8Rows& src) {
    const int64_t tiles = K / kTileK, blocks = N / kTileN, split = item_split(blocks, threads);
    const int64_t items = (blocks + kMaxBlocks - 1) / kMaxBlocks * split;
    uint16_t* xt = inputs_buffer(M, K);
    for (int64_t g = 0; g * 16 < M; ++g)
        for (int64_t i = 0; i < tiles; ++i) transpose_inputs(x, M, K, g, i, xt);
#pragma omp parallel num_threads(threads)
    {
        configure_rows_tiles(M);
        alignas(64) uint16_t a[2][kTileN * kTileK];
#pragma omp for schedule(static)
        for (int64_t t = 0; t < items; ++t) {
            const Item it = src.item(t, split);
            if (it.nb <= 0) continue;
            rows_blocks(src, xt, tiles, it.b * kTileN, it.nb, M, y, N, a);
        }
        _tile_release();
    }
}

// Vector rows stream path (8-bit rows without AMX, a few tokens): no panel, so no weight is stored
// and read back. R outputs' rows are dequantized as they lie, a tile of 32 inputs at a time into
// registers, and each token's 32 inputs meet them in one dot product per output: lane j sums the
// pairs (2j, 2j + 1) of every tile, and the 16 lanes are added once at the end. All M tokens'
// sums stay in registers (R x M of them), so the weights are read and dequantized once per call.
// The inputs are first copied tile by tile (xs: tile i's M x 32 inputs at xs + i * M * 32): read in
// place, M rows 2 K bytes apart fall in one L1 set, which holds 8 lines (12 to 16 tokens ran at
// half the speed). More tokens than registers hold run in passes, the first keeping its rows'
// dequantized weights (R x K bf16, in L1 or L2) for the others.
constexpr int64_t kStreamRowsMax = 14;  // tokens per pass: 2 x 14 sums, two rows and an input in 32 registers

// Where a pass takes its rows' weights: dequantized (a call's only pass), dequantized and kept in a
// per-thread buffer (the first of several passes), or read back from that buffer (the later ones),
// so more tokens than one pass holds still dequantize each weight once.
enum class Rows { kDequantize, kKeep, kReuse };

// Lane j of the result: the sum of v[j]'s 16 lanes, for 16 vectors at once: a tree of adds whose
// operands are shuffled together, 45 instructions where 16 reduce_adds take about 8 each, each a
// chain of dependent steps. With few inputs per output those were a large part of a call: the stream
// path ran up to 1.3x as fast with this on 1536 x 576 at 16 tokens (bench/results/kernels.md).
inline __m512 lane_totals(const __m512 (&v)[16]) {
    __m512 a[8], b[4], c[2];
    for (int i = 0; i < 8; ++i)  // each 128-bit chunk: v[2i], v[2i + 1], v[2i], v[2i + 1]
        a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; ++i)  // each chunk: v[4i] .. v[4i + 3] over its own lanes
        b[i] = _mm512_add_ps(_mm512_shuffle_ps(a[2 * i], a[2 * i + 1], 0x44),
                             _mm512_shuffle_ps(a[2 * i], a[2 * i + 1], 0xEE));
    for (int i = 0; i < 2; ++i)  // chunks: v[8i] .. v[8i + 3] over chunks 0-1, then 2-3; v[8i + 4] .. likewise
        c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xDD));
}

template <int R, int M, Rows mode>
void stream_rows(const Int8Rows& src, const uint16_t* xs, int64_t K, int64_t n0, uint16_t* kept, uint16_t* y,
                 int64_t N) {
    __m512 acc[M][R];
#pragma GCC unroll 16
    for (int m = 0; m < M; ++m)
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
    for (int64_t i = 0; i < K / kTileK; ++i) {
        __m512bh wv[R];
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) {
            // kept is null in a call's only pass: no address into it is formed there.
            if constexpr (mode == Rows::kReuse) {
                wv[r] = (__m512bh)_mm512_load_si512(kept + (i * R + r) * kTileK);
            } else {
                wv[r] = (__m512bh)src.row_ahead(n0 + r, i);
                if constexpr (mode == Rows::kKeep) _mm512_store_si512(kept + (i * R + r) * kTileK, (__m512i)wv[r]);
            }
        }
#pragma GCC unroll 16
        for (int m = 0; m < M; ++m) {
            const __m512bh xv = (__m512bh)_mm512_load_si512(xs + (i * M + m) * kTileK);
#pragma GCC unroll 4
            for (int r = 0; r < R; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], xv, wv[r]);
        }
    }
    // The M x R sums 16 at a time (token by token, output by output), each one's lanes added.
    constexpr int C = M * R;
#pragma GCC unroll 2
    for (int g = 0; g < C; g += 16) {
        __m512 v[16];
#pragma GCC unroll 16
        for (int j = 0; j < 16; ++j) v[j] = g + j < C ? acc[(g + j) / R][(g + j) % R] : _mm512_setzero_ps();
        alignas(32) uint16_t out[16];
        _mm256_store_si256((__m256i*)out, (__m256i)_mm512_cvtneps_pbh(lane_totals(v)));
        for (int j = 0; j < 16 && g + j < C; ++j) y[(g + j) / R * N + n0 + (g + j) % R] = out[j];
    }
}

// stream_rows' instance for a pass of m <= M tokens.
template <int R, int M = kStreamRowsMax>
void stream_pass(int64_t m, Rows mode, const Int8Rows& src, const uint16_t* xs, int64_t K, int64_t n0,
                 uint16_t* kept, uint16_t* y, int64_t N) {
    if constexpr (M > 1)
        if (m < M) return stream_pass<R, M - 1>(m, mode, src, xs, K, n0, kept, y, N);
    if constexpr (R <= 2 || M <= 8) {  // 3 outputs only up to 8 tokens (registers)
        if (mode == Rows::kDequantize) stream_rows<R, M, Rows::kDequantize>(src, xs, K, n0, kept, y, N);
        else if (mode == Rows::kKeep) stream_rows<R, M, Rows::kKeep>(src, xs, K, n0, kept, y, N);
        else stream_rows<R, M, Rows::kReuse>(src, xs, K, n0, kept, y, N);
    }
}

// Outputs n0..n0 + R over all M tokens, in passes of up to `per_pass` (xs: pass q's inputs at
// xs + q * per_pass * K, laid out as stream_rows reads them).
template <int R>
void stream_outputs(const Int8Rows& src, const uint16_t* xs, int64_t M, int64_t per_pass, int64_t K, int64_t n0,
                    uint16_t* kept, uint16_t* y, int64_t N) {
    for (int64_t m0 = 0; m0 < M; m0 += per_pass) {
        const int64_t m = M - m0 < per_pass ? M - m0 : per_pass;
        const Rows mode = per_pass >= M ? Rows::kDequantize : m0 == 0 ? Rows::kKeep : Rows::kReuse;
        stream_pass<R>(m, mode, src, xs + m0 * K, K, n0, kept, y + m0 * N, N);
    }
}

// All N outputs for M tokens: up to kStreamRowsMax in one pass, more in passes of up to 8 (equal
// but for the last); 3 outputs at a time where the passes hold up to 8 tokens, else 2 (3 x 8 sums
// leave too few registers beyond). On the Zen 4 (2 threads; two builds or paths, each order once):
// 3 outputs ran 1.04-1.06x as fast as 2 at 6 and 8 tokens (5632 x 2048, 1536 x 576), 4 outputs (6
// tokens a pass) 0.65-0.8x; from 20 to 28 tokens passes of up to 8 with 3 outputs ran 1.04-1.29x
// bf16 on 5632 x 2048 and 4096 x 4096 where passes of up to 14 with 2 outputs ran 0.95-1.20x (the
// rule sends it 32 tokens at most; tests force it beyond).
void stream_rows_matmul(const uint16_t* x, int64_t M, int64_t K, int64_t N, uint16_t* y, int threads,
                        const Int8Rows& src) {
    const int64_t passes = M <= kStreamRowsMax ? 1 : (M + 7) / 8, per_pass = (M + passes - 1) / passes;
    const int R = per_pass <= 8 ? 3 : 2;
    const int64_t tiles = K / kTileK;
    uint16_t* xs = (uint16_t*)scratch(1, sizeof(uint16_t) * M * K);
    for (int64_t m0 = 0; m0 < M; m0 += per_pass) {
        const int64_t m = M - m0 < per_pass ? M - m0 : per_pass;
        for (int64_t i = 0; i < tiles; ++i)
            for (int64_t t = 0; t < m; ++t)
                memcpy(xs + m0 * K + (i * m + t) * kTileK, x + (m0 + t) * K + i * kTileK, 2 * kTileK);
    }
#pragma omp parallel num_threads(threads)
    {
        uint16_t* kept = passes > 1 ? (uint16_t*)scratch(2, sizeof(uint16_t) * R * K) : nullptr;
#pragma omp for schedule(static)
        for (int64_t c = 0; c < (N + R - 1) / R; ++c) {
            if (N - c * R >= R && R == 3) stream_outputs<3>(src, xs, M, per_pass, K, c * R, kept, y, N);
            else if (N - c * R >= R) stream_outputs<2>(src, xs, M, per_pass, K, c * R, kept, y, N);
            else
                for (int64_t n = c * R; n < N; ++n) stream_outputs<1>(src, xs, M, per_pass, K, n, kept, y, N);
        }
    }
}

}  // namespace

// y[M, N] = x[M, K] bf16 @ W^T for 8-bit weights in rows (Int8Rows: w [N][K] signed, scales fp32
// [N], zeros int32 [N]). path: 0 the vector panel path, 1 the AMX panel path, 2 the AMX rows path
// (M <= 32), 3 the AMX weight-rows panel path (the AMX panel path where K > 4096), 4 the vector
// weight-rows panel path, 5 the vector rows stream path (any M, in passes beyond kStreamRowsMax tokens); 1 to 3 only where
// treeq_amx_supported, else y is left as it was. N a multiple of 16, K of 32.
extern "C" void treeq_int8_matmul(const uint16_t* x, int64_t M, int64_t K, const int8_t* w, const float* scales,
                                  const int32_t* zeros, int64_t N, uint16_t* y, int threads, int path) {
    const bool amx = path >= 1 && path <= 3;
    if (M == 0 || (amx && !amx_usable()) || (path == 2 && M > 32)) return;
    const Int8Rows src{w, scales, zeros, N / kTileN, K};
    if (path == 5)
        stream_rows_matmul(x, M, K, N, y, threads, src);
    else if (path == 2)
        rows_amx_matmul(x, M, K, N, y, threads, src);
    else
        panel_matmul(x, M, K, N, y, threads, amx, path >= 3, src);
}
