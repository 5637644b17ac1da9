// Shared by the AVX512-BF16 kernels of 4-bit tiles (cpu_int4_avx512.cpp) and 8-bit rows
// (cpu_int8_avx512.cpp): the tile constants, AMX tile state and per-thread scratch, and the panel
// paths, which dequantize a unit of 4 blocks of 16 outputs once per call into bf16 panels that AMX
// tiles or the vector units then multiply with every token row. A weight format plugs in as a
// Source: item(t, split) places work item t, and fill<NB>(it, k0, k1, panel, weight_rows)
// dequantizes input tiles k0..k1 of its NB blocks into the panel.
#pragma once

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <type_traits>

#ifdef TREEQ_AMX_EMULATED  // tests of the AMX paths on CPUs without AMX (cpu_isa.amx_emulated)
#include "amx_emulated.h"
#endif

namespace {

constexpr int kTileN = 16;  // output rows per block (lanes)
constexpr int kTileK = 32;  // inputs per tile
constexpr int kMaxBlocks = 4;  // blocks per unit

// 16 fp32 sums as bf16 at dst, rounded to nearest even as torch rounds. Every path ends here: a bf16
// result saves the caller a conversion pass and the fp32 output's allocation, which cost a small
// layer more than its products (a 576 x 576 layer's 64-token call took twice as long as its kernel).
inline void store_bf16_lanes(uint16_t* dst, __m512 sums) {
    _mm256_storeu_si256((__m256i*)dst, (__m256i)_mm512_cvtneps_pbh(sums));
}

// rows x width fp32 sums (row stride ``stride`` floats; width a multiple of 16) into bf16 y (row
// stride N).
inline void store_bf16(const float* src, int64_t rows, int64_t width, int64_t stride, uint16_t* y, int64_t N) {
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t j = 0; j < width; j += 16) store_bf16_lanes(y + r * N + j, _mm512_loadu_ps(src + r * stride + j));
}

struct alignas(64) TileConfig {
    uint8_t palette = 1, start_row = 0, reserved[14] = {0};
    uint16_t colsb[16] = {0};
    uint8_t rows[16] = {0};
};

// Activation and accumulator tiles hold ``rows`` token rows (all of them when M < 16, so
// decoding reads x in place); weight tiles (1 and 6) always 16.
void configure_tiles(int rows) {
    TileConfig c;
    for (int i = 0; i < 8; ++i) {
        c.rows[i] = i == 1 || i == 6 ? 16 : rows;
        c.colsb[i] = 64;
    }
    _tile_loadconfig(&c);
}

// Per-thread scratch kept between calls, grown to the largest request: decoding calls the kernel
// hundreds of times per token, and fresh allocations showed in small modules' time.
void* scratch(int slot, size_t bytes) {
    thread_local void* buf[4] = {nullptr, nullptr, nullptr, nullptr};
    thread_local size_t cap[4] = {0, 0, 0, 0};
    if (bytes > cap[slot]) {
        free(buf[slot]);
        cap[slot] = (bytes + 63) / 64 * 64;
        buf[slot] = aligned_alloc(64, cap[slot]);
    }
    return buf[slot];
}

// The accumulator tile of block b (tiles 2..5) to or from memory (row stride in floats).
inline void acc_store(int b, float* dst, int64_t stride) {
    switch (b) {
        case 0: _tile_stored(2, dst, stride * 4); break;
        case 1: _tile_stored(3, dst, stride * 4); break;
        case 2: _tile_stored(4, dst, stride * 4); break;
        default: _tile_stored(5, dst, stride * 4); break;
    }
}

inline void acc_load(int b, const float* src, int64_t stride) {
    switch (b) {
        case 0: _tile_loadd(2, src, stride * 4); break;
        case 1: _tile_loadd(3, src, stride * 4); break;
        case 2: _tile_loadd(4, src, stride * 4); break;
        default: _tile_loadd(5, src, stride * 4); break;
    }
}

inline void acc_zero(int b) {
    switch (b) {
        case 0: _tile_zero(2); break;
        case 1: _tile_zero(3); break;
        case 2: _tile_zero(4); break;
        default: _tile_zero(5); break;
    }
}

// The 16 x 16 32-bit matrix r transposed in place (r[i] lane j <-> r[j] lane i).
void transpose16(__m512i r[16]) {
    __m512i t[16], u[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        u[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        u[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        u[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        u[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    // Now u[4a + c] holds, in 128-bit lane l, column 4l + c of rows 4a..4a+3.
    for (int h = 0; h < 16; h += 8)
        for (int c = 0; c < 4; ++c) {
            t[h + c] = _mm512_shuffle_i32x4(u[h + c], u[h + 4 + c], 0x88);
            t[h + 4 + c] = _mm512_shuffle_i32x4(u[h + c], u[h + 4 + c], 0xdd);
        }
    for (int c = 0; c < 8; ++c) {
        r[c] = _mm512_shuffle_i32x4(t[c], t[8 + c], 0x88);
        r[8 + c] = _mm512_shuffle_i32x4(t[c], t[8 + c], 0xdd);
    }
}

// AMX panel path (long prompts). The AMX path above applies each group's scale to fp32 sums it takes
// out of the tiles, a vector step per group and 16 token rows that outweighs the tile products
// themselves once the tokens are many. Here a unit's weights are dequantized once per call, each the
// bf16 of (q - zero) * scale as treeq_int4_dequantize writes it, into a panel of B tiles over up to
// kPanelTiles tiles of inputs; token rows then run chains of tile products over the whole panel, the
// sums staying in the tiles. A panel is larger than L1, so its weight tiles come from L2, which sets
// the pace: 16 token rows against the unit's 4 blocks load a weight tile per product; 32 rows against
// 2 blocks, one per two products, but two activation tiles per step, which stay in L1 (read once for
// each pair of blocks) only where the inputs are few. So 32 rows x 2 blocks up to kRows32MaxInputs
// inputs (on an AMX Xeon, 1 thread, 256 tokens: 0.78 -> 1.09x bf16 on 576 x 576, 0.86 -> 0.94x on
// 2048 x 2048; 4096 x 4096 at 1024 tokens 1.01 -> 0.97x), 16 x 4 above. Also measured against it
// (bench/results/kernels.md): splitting the chain so a panel's part stays in L1 (sums stored and
// reloaded between parts), packing the inputs tile by tile, dequantizing the next panel between tile
// products, and prefetching the weight tiles were all slower or no faster; prefetching the next
// inputs' rows was faster at 256 tokens.
constexpr int64_t kPanelTiles = 128;  // 4096 inputs: a unit's panel is 512 KiB, within L2
constexpr int64_t kRows32MaxInputs = 2048;
static_assert(kRows32MaxInputs <= kPanelTiles * kTileK, "chain_rows32 carries no sums from panel to panel");
constexpr int64_t kPanelAhead = 2;  // input tiles between a row's prefetch and its load

// A chain's sums in accumulator j (tile 2 + j): zeroed before the first panel, else loaded from
// part, where the previous panel left them; after the last panel rounded to bf16 into rows token
// rows of y (row stride N), else stored to part for the next.
inline void acc_begin(int j, bool first, const float* part) {
    if (first) acc_zero(j);
    else acc_load(j, part, kTileN);
}

inline void acc_end(int j, bool last, float* part, int64_t rows, uint16_t* y, int64_t N) {
    if (!last) {
        acc_store(j, part, kTileN);
        return;
    }
    alignas(64) float c[kTileN * kTileN];
    acc_store(j, c, kTileN);
    store_bf16(c, rows, kTileN, kTileN, y, N);
}

// One chain over input tiles k0..k1 of the panel for 16 token rows (xa: the first one's inputs, row
// stride K) and the unit's NB blocks: one activation tile, then each block's weight tile, per step.
template <int NB>
void chain_rows16(const uint16_t* xa, int64_t rows, int64_t K, const uint16_t* panel, int64_t k0, int64_t k1,
                  bool first, bool last, float* part, uint16_t* y, int64_t N) {
    for (int b = 0; b < NB; ++b) acc_begin(b, first, part + b * 256);
    for (int64_t i = k0; i < k1; ++i) {
        const uint16_t* bt = panel + (i - k0) * NB * kTileN * kTileK;
        for (int r = 0; r < rows; ++r)
            _mm_prefetch((const char*)(xa + r * K + (i + kPanelAhead) * kTileK), _MM_HINT_T0);
        _tile_loadd(0, xa + i * kTileK, K * 2);
        _tile_loadd(1, bt, 64);
        _tile_dpbf16ps(2, 0, 1);
        if constexpr (NB > 1) { _tile_loadd(6, bt + kTileN * kTileK, 64); _tile_dpbf16ps(3, 0, 6); }
        if constexpr (NB > 2) { _tile_loadd(1, bt + 2 * kTileN * kTileK, 64); _tile_dpbf16ps(4, 0, 1); }
        if constexpr (NB > 3) { _tile_loadd(6, bt + 3 * kTileN * kTileK, 64); _tile_dpbf16ps(5, 0, 6); }
    }
    for (int b = 0; b < NB; ++b) acc_end(b, last, part + b * 256, rows, y + b * kTileN, N);
}

// One chain for 32 token rows (two activation tiles, 0 and 7) and PB = 1 or 2 blocks of the unit
// starting at block p (weight tiles 1 and 6): four products per two weight tiles, where the chain
// above takes one per weight tile. Accumulator 2 + j holds rows (j / 2) * 16 on of block p + j % 2.
// Only where one panel holds all the inputs (kRows32MaxInputs), so no sums are carried.
template <int NB, int PB>
void chain_rows32(const uint16_t* xa, int64_t K, const uint16_t* panel, int p, int64_t tiles, uint16_t* y,
                  int64_t N) {
    for (int j = 0; j < 4; ++j)
        if (j % 2 < PB) acc_zero(j);
    const uint16_t* xb = xa + kTileN * K;
    for (int64_t i = 0; i < tiles; ++i) {
        const uint16_t* bt = panel + (i * NB + p) * kTileN * kTileK;
        _tile_loadd(0, xa + i * kTileK, K * 2);
        _tile_loadd(1, bt, 64);
        _tile_dpbf16ps(2, 0, 1);
        _tile_loadd(7, xb + i * kTileK, K * 2);
        _tile_dpbf16ps(4, 7, 1);
        if constexpr (PB > 1) {
            _tile_loadd(6, bt + kTileN * kTileK, 64);
            _tile_dpbf16ps(3, 0, 6);
            _tile_dpbf16ps(5, 7, 6);
        }
    }
    for (int j = 0; j < 4; ++j)
        if (j % 2 < PB) acc_end(j, true, nullptr, kTileN, y + (j / 2 * kTileN) * N + j % 2 * kTileN, N);
}

// NB blocks of 16 outputs for M token rows, y written in bf16. Tiles configured as for the AMX
// path, tile 7 as a second activation tile; tail: as there (the call's last M % 16 rows, padded),
// null where the tiles hold every row; panel: NB * kPanelTiles tiles of scratch; sums: [M/16][NB]
// [16 x 16] scratch that carries a panel's sums to the next where the inputs take several panels.
// rows32: whether 32 token rows at a time take chain_rows32. fill(k0, k1, panel) dequantizes input
// tiles k0..k1 of the unit's NB blocks into panel; null where panel already holds the unit's
// weights (one panel only: a later pass of token rows, see panel_matmul).
template <int NB, class Fill>
void blocks_amx_panel(const uint16_t* x, const uint16_t* tail, int64_t M, int64_t K, const Fill* fill, uint16_t* y,
                      int64_t N, uint16_t* panel, float* sums, bool rows32) {
    const int64_t tiles = K / kTileK;
    for (int64_t k0 = 0; k0 < tiles; k0 += kPanelTiles) {
        const int64_t k1 = tiles - k0 < kPanelTiles ? tiles : k0 + kPanelTiles;
        const bool first = k0 == 0, last = k1 == tiles;
        if (fill) (*fill)(k0, k1, panel);
        for (int64_t m0 = 0; m0 < M;) {
            if (rows32 && M - m0 >= 32) {
                for (int p = 0; p + 1 < NB; p += 2)
                    chain_rows32<NB, 2>(x + m0 * K, K, panel, p, tiles, y + m0 * N + p * kTileN, N);
                if constexpr (NB % 2)
                    chain_rows32<NB, 1>(x + m0 * K, K, panel, NB - 1, tiles, y + m0 * N + (NB - 1) * kTileN, N);
                m0 += 32;
                continue;
            }
            const int64_t rows = M - m0 < 16 ? M - m0 : 16;
            const uint16_t* xa = tail && rows < 16 ? tail : x + m0 * K;  // tiles hold 16 rows
            float* part = sums ? sums + (m0 / 16) * NB * 256 : nullptr;  // null: one panel, no sums carried
            chain_rows16<NB>(xa, rows, K, panel, k0, k1, first, last, part, y + m0 * N, N);
            m0 += 16;
        }
    }
}

// Vector panel path (long prompts without AMX): the AMX panel path's panels, multiplied by the
// vector units. A panel tile's row p is 16 outputs' pairs of inputs 2p, 2p + 1, one dot-product
// operand against a broadcast input pair, so R token rows x NB blocks of sums stay in registers over
// the whole panel, as in the expanded path but with no scale or zero point to apply per group: the
// weights are the reference kernel's bf16 ones already. 24 sums per chain (R = 24 / NB, at most 12
// rows: beyond that the broadcasts, one load each, outnumber the products).
template <int NB>
constexpr int kVectorPanelRows = 24 / NB < 12 ? 24 / NB : 12;

// R token rows (x: the first one's inputs, row stride K) against input tiles k0..k1 of the panel:
// sums zeroed before the first panel, else loaded from part (R x NB x 16 fp32, where the previous
// panel left them); after the last panel rounded to bf16 into y (row stride N), else stored to part.
template <int NB, int R>
void chain_vector(const uint16_t* x, int64_t K, const uint16_t* panel, int64_t k0, int64_t k1, bool first,
                  bool last, float* part, uint16_t* y, int64_t N) {
    __m512 acc[R][NB];
    for (int r = 0; r < R; ++r)
        for (int b = 0; b < NB; ++b) acc[r][b] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(part + (r * NB + b) * kTileN);
    const uint32_t* xp = (const uint32_t*)x;  // input pairs
    for (int64_t i = k0; i < k1; ++i) {
        const uint16_t* bt = panel + (i - k0) * NB * kTileN * kTileK;
        for (int p = 0; p < kTileK / 2; ++p) {
            __m512bh wv[NB];
            for (int b = 0; b < NB; ++b) wv[b] = (__m512bh)_mm512_load_si512(bt + b * kTileN * kTileK + p * 2 * kTileN);
            for (int r = 0; r < R; ++r) {
                const __m512bh xb = (__m512bh)_mm512_set1_epi32(xp[r * K / 2 + i * kTileK / 2 + p]);
                for (int b = 0; b < NB; ++b) acc[r][b] = _mm512_dpbf16_ps(acc[r][b], xb, wv[b]);
            }
        }
    }
    for (int r = 0; r < R; ++r)
        for (int b = 0; b < NB; ++b) {
            if (last) store_bf16_lanes(y + r * N + b * kTileN, acc[r][b]);
            else _mm512_storeu_ps(part + (r * NB + b) * kTileN, acc[r][b]);
        }
}

// chain_vector for the last ``rows`` < R rows of a call: the instance with that many.
template <int NB, int R>
void chain_vector_rows(int64_t rows, const uint16_t* x, int64_t K, const uint16_t* panel, int64_t k0, int64_t k1,
                       bool first, bool last, float* part, uint16_t* y, int64_t N) {
    if constexpr (R > 1)
        if (rows < R) return chain_vector_rows<NB, R - 1>(rows, x, K, panel, k0, k1, first, last, part, y, N);
    chain_vector<NB, R>(x, K, panel, k0, k1, first, last, part, y, N);
}

// NB blocks of 16 outputs for M token rows, as blocks_amx_panel (fill, panel, sums: the same) with
// vector chains.
template <int NB, class Fill>
void blocks_vector_panel(const uint16_t* x, int64_t M, int64_t K, const Fill* fill, uint16_t* y, int64_t N,
                         uint16_t* panel, float* sums) {
    constexpr int R = kVectorPanelRows<NB>;
    const int64_t tiles = K / kTileK;
    for (int64_t k0 = 0; k0 < tiles; k0 += kPanelTiles) {
        const int64_t k1 = tiles - k0 < kPanelTiles ? tiles : k0 + kPanelTiles;
        const bool first = k0 == 0, last = k1 == tiles;
        if (fill) (*fill)(k0, k1, panel);
        for (int64_t m0 = 0; m0 < M; m0 += R) {
            float* part = sums ? sums + m0 * NB * kTileN : nullptr;  // null: one panel, no sums carried
            chain_vector_rows<NB, R>(M - m0, x + m0 * K, K, panel, k0, k1, first, last, part, y + m0 * N, N);
        }
    }
}

// Work item t of a call: unit t / split whole (split 1) or, split 2, its half t % 2 of up to 2 blocks
// (none for the second half of a last unit of 2 blocks or fewer). w: its first block's first tile;
// stride: its unit's blocks, whose tiles interleave; scales, zeros: its first block's.
struct Item {
    int64_t b, nb, stride;
    const uint8_t* w;
    const uint16_t* scales;
    const uint8_t* zeros;
};

// Its blocks alone (pointers null), for weights in another layout.
inline Item place_of(int64_t t, int64_t split, int64_t blocks) {
    const int64_t b0 = t / split * kMaxBlocks, stride = blocks - b0 < kMaxBlocks ? blocks - b0 : kMaxBlocks;
    const int64_t first = t % split * (kMaxBlocks / split), rest = stride - first;
    return {b0 + first, rest < kMaxBlocks / split ? rest : kMaxBlocks / split, stride, nullptr, nullptr, nullptr};
}

// The weight-rows forms (8-bit rows): the weights' rows as A tiles, the inputs transposed as B tiles.
void configure_rows_tiles(int64_t m) {
    const int64_t first = m > 16 ? 16 : m, second = m - first;  // token rows in each group
    TileConfig c;
    for (int i = 0; i < 8; ++i) {
        c.rows[i] = 16;
        c.colsb[i] = 4 * first;  // inputs of the first group (0), sums (2..5)
    }
    c.colsb[1] = c.colsb[6] = 64;  // weights
    if (second) c.colsb[3] = c.colsb[5] = c.colsb[7] = 4 * second;  // the second group's inputs, sums
    _tile_loadconfig(&c);
}

// A block's sums (tile 2 + b: 16 outputs x m tokens) rounded to bf16 into y (row stride N).
template <int B>
void rows_store(int64_t m, uint16_t* y, int64_t N) {
    alignas(64) float c[16 * 16];
    acc_store(B, c, 16);
    __m512i r[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm512_castps_si512(_mm512_load_ps(c + 16 * i));
    transpose16(r);  // r[t]: token t's 16 outputs
    for (int64_t t = 0; t < m; ++t) store_bf16_lanes(y + t * N, _mm512_castsi512_ps(r[t]));
}

// The inputs as B tiles, in groups of 16 token rows (the last padded with zeros): group g's tile i
// (at xt + (g * tiles + i) * 512) holds in row p pair p of inputs 32i.. for each of its token rows.
// Scratch slot 1 of the calling thread holds them.
uint16_t* inputs_buffer(int64_t M, int64_t K) {
    return (uint16_t*)scratch(1, sizeof(uint16_t) * (M + 15) / 16 * 16 * K);
}

// Group g's input tile i transposed: r[p] holds pair p of its 16 token rows' inputs.
inline void input_pairs(const uint16_t* x, int64_t M, int64_t K, int64_t g, int64_t i, __m512i r[16]) {
    for (int64_t t = 0; t < 16; ++t)
        r[t] = g * 16 + t < M ? _mm512_loadu_si512(x + (g * 16 + t) * K + i * kTileK) : _mm512_setzero_si512();
    transpose16(r);
}

inline void transpose_inputs(const uint16_t* x, int64_t M, int64_t K, int64_t g, int64_t i, uint16_t* xt) {
    __m512i r[16];
    input_pairs(x, M, K, g, i, r);
    for (int p = 0; p < 16; ++p) _mm512_store_si512(xt + ((g * (K / kTileK) + i) * 16 + p) * 32, r[p]);
}

// AMX weight-rows panel path (8-bit rows with AMX, one panel of inputs): the AMX panel path with
// the operands' roles swapped as in the rows path. A unit's weights are dequantized once per call
// into a panel of A tiles, each its 16 rows' 32 inputs as they lie (the transposing fill took a
// fifth of a 64-token call on 2048- and 4096-wide layers), and the inputs, transposed once per call,
// are the B tiles. A chain: PB blocks (tiles 1 and 6) against GB groups of 16 token rows (tiles 0
// and 7), block p's sums for group g in tile 2 + 2p + g, over all the panel's input tiles.
template <int NB, int PB, int GB>
void chain_weight_rows(const uint16_t* xt, int64_t tiles, const uint16_t* panel, int p, int64_t m, uint16_t* y,
                       int64_t N) {
    for (int j = 0; j < 4; ++j)
        if (j / 2 < PB && j % 2 < GB) acc_zero(j);
    for (int64_t i = 0; i < tiles; ++i) {
        const uint16_t* at = panel + (i * NB + p) * kTileN * kTileK;
        _tile_loadd(0, xt + i * 512, 64);
        if constexpr (GB > 1) _tile_loadd(7, xt + (tiles + i) * 512, 64);
        _tile_loadd(1, at, 64);
        _tile_dpbf16ps(2, 1, 0);
        if constexpr (GB > 1) _tile_dpbf16ps(3, 1, 7);
        if constexpr (PB > 1) {
            _tile_loadd(6, at + kTileN * kTileK, 64);
            _tile_dpbf16ps(4, 6, 0);
            if constexpr (GB > 1) _tile_dpbf16ps(5, 6, 7);
        }
    }
    const int64_t first = m < 16 ? m : 16;
    rows_store<0>(first, y, N);
    if constexpr (GB > 1) rows_store<1>(m - 16, y + 16 * N, N);
    if constexpr (PB > 1) rows_store<2>(first, y + kTileN, N);
    if constexpr (PB > 1 && GB > 1) rows_store<3>(m - 16, y + 16 * N + kTileN, N);
}

// NB blocks of 16 outputs for M token rows (xt: their transposed inputs) over one panel holding all
// K inputs; fill as in blocks_amx_panel. Tiles configured by configure_rows_tiles(32).
template <int NB, class Fill>
void blocks_amx_weight_rows(const uint16_t* xt, int64_t M, int64_t K, const Fill* fill, uint16_t* y, int64_t N,
                            uint16_t* panel) {
    const int64_t tiles = K / kTileK;
    if (fill) (*fill)(0, tiles, panel);
    for (int64_t m0 = 0; m0 < M; m0 += 32) {
        const int64_t m = M - m0 < 32 ? M - m0 : 32;
        const uint16_t* xg = xt + m0 / 16 * tiles * 512;
        for (int p = 0; p < NB; p += 2) {
            uint16_t* yp = y + m0 * N + p * kTileN;
            if (NB - p > 1 && m > 16) chain_weight_rows<NB, 2, 2>(xg, tiles, panel, p, m, yp, N);
            else if (NB - p > 1) chain_weight_rows<NB, 2, 1>(xg, tiles, panel, p, m, yp, N);
            else if (m > 16) chain_weight_rows<NB, 1, 2>(xg, tiles, panel, p, m, yp, N);
            else chain_weight_rows<NB, 1, 1>(xg, tiles, panel, p, m, yp, N);
        }
    }
}

// Vector weight-rows panel path (8-bit rows without AMX, up to 64 tokens): the vector panel path
// with the operands' roles swapped, as in the AMX weight-rows path. The panel holds a unit's weights
// as A tiles (rows as they lie: the vector panel path's fill spends about a third of its time
// transposing them, bench/results/kernels.md), the inputs transposed once per call are the vector
// operand, and a chain keeps R outputs x GB groups of 16 token rows of sums in registers, each step
// a broadcast weight pair per output against each group's 16 token pairs. vdpbf16ps's products are
// exact and added in the same order whichever operand is broadcast, so the sums are the vector
// panel path's bit for bit. Groups are whole, so fewer than 16 tokens waste the rest.
constexpr int kWeightRowsOutputs = 6, kWeightRowsGroups = 4;  // 24 sums; a unit's 16 to 64 outputs leave 0, 2 or 4

// The inputs as this path reads them: in chunks of kWeightRowsGroups groups of 16 token rows (the
// last chunk may hold fewer; chunk c at xt + c * 64 * K), pair p of input tile i of each of the
// chunk's groups in turn, so a chain's step reads its groups' token pairs from one run of memory,
// as the vector panel path reads its weights.
inline void transpose_inputs_chunked(const uint16_t* x, int64_t M, int64_t K, int64_t g, int64_t i, uint16_t* xt) {
    __m512i r[16];
    input_pairs(x, M, K, g, i, r);
    const int64_t g0 = g / kWeightRowsGroups * kWeightRowsGroups, rest = (M + 15) / 16 - g0;
    const int64_t groups = rest < kWeightRowsGroups ? rest : kWeightRowsGroups;
    uint16_t* chunk = xt + g0 * 16 * K;
    for (int p = 0; p < 16; ++p) _mm512_store_si512(chunk + ((i * 16 + p) * groups + g - g0) * 32, r[p]);
}

// 8 outputs' bf16 sums for 16 token rows (sums[r]: output r's) transposed into the token rows of y
// (row stride N; the first `tokens` of them), R outputs each: per 128-bit lane, words, then pairs,
// then quads of outputs interleaved, so lane half h of vector t holds token 8h + t's 8 outputs.
template <int R>
inline void store_token_rows(const __m256i sums[8], int64_t tokens, uint16_t* y, int64_t N) {
    __m256i a[8], b[8], c[8];
    for (int j = 0; j < 4; ++j) {
        a[2 * j] = _mm256_unpacklo_epi16(sums[2 * j], sums[2 * j + 1]);  // tokens 0-3 (8-11)
        a[2 * j + 1] = _mm256_unpackhi_epi16(sums[2 * j], sums[2 * j + 1]);  // tokens 4-7 (12-15)
    }
    for (int j = 0; j < 2; ++j)
        for (int h = 0; h < 2; ++h) {
            b[4 * j + 2 * h] = _mm256_unpacklo_epi32(a[4 * j + h], a[4 * j + 2 + h]);  // tokens 4h, 4h + 1
            b[4 * j + 2 * h + 1] = _mm256_unpackhi_epi32(a[4 * j + h], a[4 * j + 2 + h]);  // 4h + 2, 4h + 3
        }
    for (int q = 0; q < 4; ++q) {
        c[2 * q] = _mm256_unpacklo_epi64(b[q], b[4 + q]);  // token 2q (8 + 2q)
        c[2 * q + 1] = _mm256_unpackhi_epi64(b[q], b[4 + q]);  // token 2q + 1
    }
    for (int64_t t = 0; t < 16 && t < tokens; ++t) {
        const __m128i v = t < 8 ? _mm256_castsi256_si128(c[t]) : _mm256_extracti128_si256(c[t - 8], 1);
        uint16_t* dst = y + t * N;
        if constexpr (R >= 4) _mm_storel_epi64((__m128i*)dst, v);
        if constexpr (R == 6) _mm_storeu_si32(dst + 4, _mm_srli_si128(v, 8));
        if constexpr (R == 2) _mm_storeu_si32(dst, v);
    }
}

// Outputs o0..o0 + R - 1 of the unit's NB blocks against a chunk of GB groups of 16 token rows (xt:
// its transposed inputs, transpose_inputs_chunked; `tokens` rows in all) over input tiles k0..k1 of
// the panel. Sums zeroed before the first panel, else loaded from part (group g's output o at part +
// (g * NB * kTileN + o) * 16, where the previous panel left them); after the last panel rounded to
// bf16 into y (output o0's column of the first token row; row stride N), else stored to part.
template <int NB, int R, int GB>
void chain_vector_weight_rows(const uint16_t* xt, const uint16_t* panel, int o0, int64_t k0, int64_t k1,
                              int64_t tokens, bool first, bool last, float* part, uint16_t* y, int64_t N) {
    const uint32_t* w32 = (const uint32_t*)panel;  // pairs of inputs
    const uint32_t* x32 = (const uint32_t*)xt;
    int64_t at[R];  // output o0 + r's pairs in a panel tile: its block's tile, its row
    for (int r = 0; r < R; ++r) at[r] = (o0 + r) / kTileN * kTileN * kTileK / 2 + (o0 + r) % kTileN * kTileK / 2;
    __m512 acc[R][GB];
    for (int r = 0; r < R; ++r)
        for (int g = 0; g < GB; ++g)
            acc[r][g] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(part + (g * NB * kTileN + o0 + r) * kTileN);
    for (int64_t i = k0; i < k1; ++i) {
        const uint32_t* wt = w32 + (i - k0) * NB * kTileN * kTileK / 2;
        const uint32_t* xi = x32 + i * GB * kTileN * kTileK / 2;
        for (int p = 0; p < kTileK / 2; ++p) {
            __m512bh xv[GB];
            for (int g = 0; g < GB; ++g) xv[g] = (__m512bh)_mm512_load_si512(xi + (p * GB + g) * kTileN);
            for (int r = 0; r < R; ++r) {
                const __m512bh wb = (__m512bh)_mm512_set1_epi32(wt[at[r] + p]);
                for (int g = 0; g < GB; ++g) acc[r][g] = _mm512_dpbf16_ps(acc[r][g], wb, xv[g]);
            }
        }
    }
    if (!last) {
        for (int r = 0; r < R; ++r)
            for (int g = 0; g < GB; ++g) _mm512_storeu_ps(part + (g * NB * kTileN + o0 + r) * kTileN, acc[r][g]);
        return;
    }
    for (int g = 0; g < GB && g * kTileN < tokens; ++g) {
        __m256i sums[8];  // output r's 16 tokens in bf16 (outputs R.. zero)
        for (int r = 0; r < 8; ++r) sums[r] = r < R ? (__m256i)_mm512_cvtneps_pbh(acc[r][g]) : _mm256_setzero_si256();
        store_token_rows<R>(sums, tokens - g * kTileN, y + g * kTileN * N, N);
    }
}

// The chain over `groups` (1 to GB) groups of token rows.
template <int NB, int R>
void chain_vector_weight_rows_groups(int64_t groups, const uint16_t* xt, const uint16_t* panel, int o0,
                                     int64_t k0, int64_t k1, int64_t tokens, bool first, bool last, float* part,
                                     uint16_t* y, int64_t N) {
    static_assert(kWeightRowsGroups == 4, "one case per count of groups");
    switch (groups) {
        case 1: return chain_vector_weight_rows<NB, R, 1>(xt, panel, o0, k0, k1, tokens, first, last, part, y, N);
        case 2: return chain_vector_weight_rows<NB, R, 2>(xt, panel, o0, k0, k1, tokens, first, last, part, y, N);
        case 3: return chain_vector_weight_rows<NB, R, 3>(xt, panel, o0, k0, k1, tokens, first, last, part, y, N);
        default: return chain_vector_weight_rows<NB, R, 4>(xt, panel, o0, k0, k1, tokens, first, last, part, y, N);
    }
}

// NB blocks of 16 outputs for M token rows (xt: their transposed inputs), a panel of input tiles
// at a time; fill as in blocks_amx_panel; sums: [M/16][NB * 16][16] scratch that carries a panel's
// sums to the next where the inputs take several panels.
template <int NB, class Fill>
void blocks_vector_weight_rows(const uint16_t* xt, int64_t M, int64_t K, const Fill* fill, uint16_t* y, int64_t N,
                               uint16_t* panel, float* sums) {
    constexpr int R = kWeightRowsOutputs;
    static_assert(NB * kTileN % R % 2 == 0, "the last chain of a unit has 2 or 4 outputs");
    const int64_t tiles = K / kTileK;
    for (int64_t k0 = 0; k0 < tiles; k0 += kPanelTiles) {
        const int64_t k1 = tiles - k0 < kPanelTiles ? tiles : k0 + kPanelTiles;
        const bool first = k0 == 0, last = k1 == tiles;
        if (fill) (*fill)(k0, k1, panel);
        for (int64_t m0 = 0; m0 < M; m0 += kWeightRowsGroups * 16) {
            const int64_t tokens = M - m0;
            const int64_t groups = tokens < kWeightRowsGroups * 16 ? (tokens + 15) / 16 : kWeightRowsGroups;
            const uint16_t* xg = xt + m0 * K;  // chunks of 64 token rows' inputs
            float* part = sums ? sums + m0 * NB * kTileN : nullptr;  // null: one panel, no sums carried
            for (int o0 = 0; o0 < NB * kTileN; o0 += R) {
                const auto chain = [&](auto outputs) {
                    chain_vector_weight_rows_groups<NB, decltype(outputs)::value>(
                        groups, xg, panel, o0, k0, k1, tokens, first, last, part, y + m0 * N + o0, N);
                };
                const int outputs = NB * kTileN - o0 < R ? NB * kTileN - o0 : R;
                if (outputs == R) chain(std::integral_constant<int, R>{});
                else if (outputs == 4) chain(std::integral_constant<int, 4>{});
                else chain(std::integral_constant<int, 2>{});
            }
        }
    }
}

// A panel path's work item: the AMX one's tile chains (amx; weight_rows: the weight-rows form, x
// then the transposed inputs) or the vector one's; fill: whether its panel is to be dequantized
// (false: kept from an earlier pass).
template <int NB, class Source>
void blocks_panel(bool amx, bool weight_rows, const uint16_t* x, const uint16_t* tail, int64_t M, int64_t K,
                  const Source& src, const Item& it, uint16_t* y, int64_t N, uint16_t* panel, float* sums, bool rows32,
                  bool fill) {
    const auto fill_panel = [&](int64_t k0, int64_t k1, uint16_t* p) {
        src.template fill<NB>(it, k0, k1, p, weight_rows);
    };
    const auto* f = fill ? &fill_panel : nullptr;
    if (weight_rows && amx)
        blocks_amx_weight_rows<NB>(x, M, K, f, y, N, panel);
    else if (weight_rows)
        blocks_vector_weight_rows<NB>(x, M, K, f, y, N, panel, sums);
    else if (amx)
        blocks_amx_panel<NB>(x, tail, M, K, f, y, N, panel, sums, rows32);
    else
        blocks_vector_panel<NB>(x, M, K, f, y, N, panel, sums);
}

// Token rows per pass of the panel paths, where a unit's inputs fit one panel: a pass's inputs
// (kPanelPassBytes) then stay in L2 across the thread's units, each unit's panel dequantized in the
// first pass and kept. In one pass the inputs were read from memory once per unit: from 1536
// tokens, 576 and 1536 inputs wide, passes of 512 KiB ran 1.13-1.45x as fast (AMX Xeon, 2 MB L2, 1
// and 2 threads; bench/results/kernels.md); passes of 1 MiB were no faster. A thread keeps up to
// kPanelKeepBytes of panels; where its units need more, they run in groups of that much, each group
// through every pass (the inputs then read once per group). With a pass's inputs that fits a 2 MB
// L2: groups of 2 MiB ran 0.76-0.86x as fast as 1 MiB on 4096 x 4096 from 512 tokens (AMX Xeon).
constexpr int64_t kPanelPassBytes = 512 << 10;
constexpr int64_t kPanelKeepBytes = 1 << 20;

bool amx_usable() {
#ifdef TREEQ_AMX_EMULATED
    return true;  // amx_emulated.h stands in for the tiles
#else
    static const bool ok = [] {
        __builtin_cpu_init();
        if (!__builtin_cpu_supports("amx-bf16")) return false;
        // Linux hands out the tile state only to processes that ask for it (ARCH_REQ_XCOMP_PERM).
        return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
    }();
    return ok;
#endif
}

// The last M % 16 token rows of x padded with zeros to 16 (AMX tiles hold 16 rows), or null where
// the tiles hold every row (M <= 16 or a multiple of 16).
const uint16_t* padded_tail(const uint16_t* x, int64_t M, int64_t K) {
    if (M <= 16 || M % 16 == 0) return nullptr;
    const int64_t r = M % 16;
    uint16_t* tail = (uint16_t*)scratch(1, sizeof(uint16_t) * 16 * K);
    memcpy(tail, x + (M - r) * K, sizeof(uint16_t) * r * K);
    memset(tail + r * K, 0, sizeof(uint16_t) * (16 - r) * K);
    return tail;
}

// Work items: units of 4 blocks or, where those do not divide evenly among the threads (SmolLM2's
// 192 and 576 outputs make 3 and 9), half units of 2 blocks, so no thread waits on another's extra
// unit (bench/results/kernels.md). Returns the split (1 or 2); items = units * split.
inline int64_t item_split(int64_t blocks, int threads) {
    return (blocks + kMaxBlocks - 1) / kMaxBlocks % threads ? 2 : 1;
}

// The panel paths: y[M, N] = x[M, K] @ W^T in bf16 for the weights src reads, each unit's weights
// dequantized once per call (AMX tiles where amx, else the vector units). Long prompts run in
// passes of token rows (a multiple of 32), each thread's units keeping their panels from the first.
// rows: the weight-rows form (8-bit rows; with AMX only where one panel holds all the inputs).
template <class Source>
void panel_matmul(const uint16_t* x, int64_t M, int64_t K, int64_t N, uint16_t* y, int threads, bool amx,
                  bool rows, const Source& src) {
    const bool one_panel = K / kTileK <= kPanelTiles, weight_rows = rows && (one_panel || !amx);
    const uint16_t* tail = amx && !weight_rows ? padded_tail(x, M, K) : nullptr;
    uint16_t* xt = weight_rows ? inputs_buffer(M, K) : nullptr;
    const int64_t blocks = N / kTileN, split = item_split(blocks, threads);
    const int64_t items = (blocks + kMaxBlocks - 1) / kMaxBlocks * split;
    const bool rows32 = K <= kRows32MaxInputs;
    const int64_t panel_tiles = K / kTileK < kPanelTiles ? K / kTileK : kPanelTiles;
    const int64_t panel_bytes = sizeof(uint16_t) * kMaxBlocks * panel_tiles * kTileN * kTileK;
    // Passes whole chunks of the vector weight-rows path's inputs (transpose_inputs_chunked).
    const int64_t pass_unit = weight_rows && !amx ? 16 * kWeightRowsGroups : 32;
    const int64_t pass_rows = kPanelPassBytes / (2 * K) / pass_unit * pass_unit;
    const int64_t pass = one_panel && pass_rows > 0 ? pass_rows : M;
    // Work items in groups of as many panels as each thread keeps (kPanelKeepBytes), each group
    // through every pass: a pass's inputs are then read from memory once per group, not per unit.
    const int64_t keep_units = kPanelKeepBytes / panel_bytes > 0 ? kPanelKeepBytes / panel_bytes : 1;
    const int64_t group_items = pass < M && keep_units * threads < items ? keep_units * threads : items;
    const int64_t kept_panels = (group_items + threads - 1) / threads;
#pragma omp parallel num_threads(threads)
    {
        if (weight_rows) {
            if (amx) configure_rows_tiles(32);
            // In this parallel region, not one of its own: a small layer's call takes 0.1 ms.
#pragma omp for schedule(static) collapse(2)
            for (int64_t g = 0; g < (M + 15) / 16; ++g)
                for (int64_t i = 0; i < K / kTileK; ++i)
                    if (amx) transpose_inputs(x, M, K, g, i, xt);
                    else transpose_inputs_chunked(x, M, K, g, i, xt);
        } else if (amx) {
            configure_tiles(M < 16 ? int(M) : 16);
        }
        uint16_t* bbuf = (uint16_t*)scratch(2, panel_bytes * (pass < M ? kept_panels : 1));
        float* acc = nullptr;
        if (!one_panel)  // sums carried from panel to panel
            acc = (float*)scratch(3, sizeof(float) * (M + 15) / 16 * 16 * kMaxBlocks * kTileN);
        // As the expanded path: a pass of token rows through the thread's units of the group (the
        // same units in every pass, so each keeps its panel from the first), then the next pass.
        for (int64_t g0 = 0; g0 < items; g0 += group_items)
        for (int64_t m1 = 0; m1 < M; m1 += pass) {
            const int64_t rows = M - m1 < pass ? M - m1 : pass, g1 = items - g0 < group_items ? items : g0 + group_items;
            const uint16_t* xm = weight_rows ? xt + m1 / 16 * (K / kTileK) * kTileN * kTileK : x + m1 * K;
            int64_t kept = 0;  // this thread's units so far in this pass
#pragma omp for schedule(static) nowait
            for (int64_t t = g0; t < g1; ++t) {
                const Item it = src.item(t, split);
                if (it.nb <= 0) continue;
                uint16_t* ym = y + m1 * N + it.b * kTileN;
                uint16_t* pb = bbuf + (pass < M ? kept++ : 0) * panel_bytes / sizeof(uint16_t);
                const bool dq = m1 == 0;
                switch (it.nb) {
                    case 1: blocks_panel<1>(amx, weight_rows, xm, tail, rows, K, src, it, ym, N, pb, acc, rows32, dq); break;
                    case 2: blocks_panel<2>(amx, weight_rows, xm, tail, rows, K, src, it, ym, N, pb, acc, rows32, dq); break;
                    case 3: blocks_panel<3>(amx, weight_rows, xm, tail, rows, K, src, it, ym, N, pb, acc, rows32, dq); break;
                    default: blocks_panel<4>(amx, weight_rows, xm, tail, rows, K, src, it, ym, N, pb, acc, rows32, dq); break;
                }
            }
        }
        if (amx) _tile_release();
    }
}

}  // namespace

extern "C" int treeq_cpu_supported() {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512bf16");
}

extern "C" int treeq_amx_supported() { return amx_usable(); }
