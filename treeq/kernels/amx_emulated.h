// AMX-BF16's tile instructions in software, so the AMX paths of the AVX512-BF16 kernels run, and are
// tested, on CPUs without AMX. Built only with TREEQ_AMX_EMULATED defined (and without -mamx-*):
// cpu_isa.amx_emulated(), a test aid; nothing selects it on its own. Slow (plain loops), exact in
// what the paths' results depend on: a tile product adds exact bf16 x bf16 products into fp32 sums
// in the order Intel's pseudocode gives (the hardware's order may differ by fp32 rounding, which the
// tests allow for), and rows or columns beyond a tile's configured shape read as zeros.
//
// A configuration the hardware would refuse with #UD (shapes that do not chain, more than 16 rows
// or 64 bytes a row) aborts with a message, as the hardware would stop the process with SIGILL.
#pragma once

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

namespace amx_emulated {

constexpr int kTiles = 8, kRows = 16, kRowBytes = 64;

struct State {
    int rows[kTiles] = {0}, colsb[kTiles] = {0};
    alignas(64) uint8_t data[kTiles][kRows][kRowBytes];
};

inline State& state() {
    thread_local State s;  // each thread has its own tiles, as each core has
    return s;
}

[[noreturn]] inline void refuse(const char* why) {
    fprintf(stderr, "amx_emulated: the hardware would refuse this (#UD): %s\n", why);
    abort();
}

// The 64-byte configuration: palette (byte 0), then colsb as 16 uint16 from byte 16 and rows as 16
// bytes from byte 48 (Intel SDM, LDTILECFG). Tiles are zeroed, as LDTILECFG does.
inline void loadconfig(const void* config) {
    const uint8_t* c = (const uint8_t*)config;
    if (c[0] != 1) refuse("palette other than 1");
    State& s = state();
    for (int t = 0; t < kTiles; ++t) {
        uint16_t colsb;
        memcpy(&colsb, c + 16 + 2 * t, 2);
        s.colsb[t] = colsb;
        s.rows[t] = c[48 + t];
        if (s.colsb[t] > kRowBytes || s.rows[t] > kRows) refuse("a tile larger than 16 rows x 64 bytes");
    }
    memset(s.data, 0, sizeof s.data);
}

inline void loadd(int t, const void* base, int64_t stride) {
    State& s = state();
    memset(s.data[t], 0, sizeof s.data[t]);
    for (int r = 0; r < s.rows[t]; ++r) memcpy(s.data[t][r], (const uint8_t*)base + r * stride, s.colsb[t]);
}

inline void stored(int t, void* base, int64_t stride) {
    State& s = state();
    for (int r = 0; r < s.rows[t]; ++r) memcpy((uint8_t*)base + r * stride, s.data[t][r], s.colsb[t]);
}

inline void zero(int t) { memset(state().data[t], 0, sizeof state().data[t]); }

inline float bf16(const uint8_t* row, int i) {
    uint16_t h;
    memcpy(&h, row + 2 * i, 2);
    const uint32_t u = uint32_t(h) << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

// C += A B: C's row m, fp32 column n, gains A's row m pair k times B's row k pair n, for each pair k
// of A's row (TDPBF16PS).
inline void dpbf16ps(int c, int a, int b) {
    State& s = state();
    if (s.colsb[c] % 4 || s.colsb[a] % 4) refuse("a row that is no whole number of pairs");
    if (s.rows[c] != s.rows[a]) refuse("the sums' rows differ from the first operand's");
    if (s.colsb[a] / 4 != s.rows[b]) refuse("the first operand's pairs differ from the second's rows");
    if (s.colsb[c] != s.colsb[b]) refuse("the sums' columns differ from the second operand's");
    for (int m = 0; m < s.rows[c]; ++m) {
        float* sums = (float*)s.data[c][m];
        for (int k = 0; k < s.colsb[a] / 4; ++k)
            for (int n = 0; n < s.colsb[c] / 4; ++n) {
                sums[n] += bf16(s.data[a][m], 2 * k) * bf16(s.data[b][k], 2 * n);
                sums[n] += bf16(s.data[a][m], 2 * k + 1) * bf16(s.data[b][k], 2 * n + 1);
            }
    }
}

}  // namespace amx_emulated

#define _tile_loadconfig(config) amx_emulated::loadconfig(config)
#define _tile_loadd(t, base, stride) amx_emulated::loadd(t, base, stride)
#define _tile_stored(t, base, stride) amx_emulated::stored(t, base, stride)
#define _tile_zero(t) amx_emulated::zero(t)
#define _tile_dpbf16ps(c, a, b) amx_emulated::dpbf16ps(c, a, b)
#define _tile_release() ((void)0)
