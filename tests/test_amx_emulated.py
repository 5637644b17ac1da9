"""AMX's tiles in software (treeq/kernels/amx_emulated.h), which let the AMX paths of the AVX512-BF16
kernels run in tests on CPUs without AMX: a tile product against torch's, shapes the hardware
refuses, and the rows and columns beyond a tile's shape."""

import ctypes
import subprocess
import sys

import pytest
import torch

from treeq import native
from treeq.kernels import cpu_int4_avx512

HEADER = cpu_int4_avx512.SOURCE.parent / "amx_emulated.h"

# C = A B for an A of `m` rows x `k` pairs and a B of `k` rows x `n` columns of pairs, tiles 0-2
# configured to those shapes, C starting from its given sums; or (shapes) any configuration, to be
# refused.
SOURCE = """
#include <stdint.h>
#include <string.h>
#include "amx_emulated.h"

struct alignas(64) Config {
    uint8_t palette = 1, start_row = 0, reserved[14] = {0};
    uint16_t colsb[16] = {0};
    uint8_t rows[16] = {0};
};

extern "C" void product(const uint16_t* a, const uint16_t* b, float* c, int m, int k, int n) {
    Config cfg;
    cfg.rows[0] = m, cfg.colsb[0] = 4 * n;  // sums
    cfg.rows[1] = m, cfg.colsb[1] = 4 * k;  // A: pairs
    cfg.rows[2] = k, cfg.colsb[2] = 4 * n;  // B: pairs of each column
    _tile_loadconfig(&cfg);
    _tile_loadd(0, c, 64);
    _tile_loadd(1, a, 64);
    _tile_loadd(2, b, 64);
    _tile_dpbf16ps(0, 1, 2);
    _tile_stored(0, c, 64);
    _tile_release();
}

extern "C" void shapes(int rows_c, int colsb_c, int rows_a, int colsb_a, int rows_b, int colsb_b) {
    Config cfg;
    cfg.rows[0] = rows_c, cfg.colsb[0] = colsb_c;
    cfg.rows[1] = rows_a, cfg.colsb[1] = colsb_a;
    cfg.rows[2] = rows_b, cfg.colsb[2] = colsb_b;
    _tile_loadconfig(&cfg);
    _tile_dpbf16ps(0, 1, 2);
}
"""


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    folder = tmp_path_factory.mktemp("amx")
    (folder / "amx_emulated.h").write_text(HEADER.read_text())
    (folder / "probe.cpp").write_text(SOURCE)
    lib, why = native.build(folder / "probe.cpp", ("-O1",))
    if lib is None:
        pytest.skip(why)
    return lib


@pytest.mark.parametrize("m,k,n", [(16, 16, 16), (5, 16, 16), (16, 7, 3)])
def test_a_tile_product_is_torchs_in_fp32_and_leaves_the_rest_alone(library, m, k, n):
    """Within each tile's shape the sums gain A B (the products exact, added in fp32); the rest of
    the 16 x 64-byte buffers is neither read nor written."""
    gen = torch.Generator().manual_seed(m * 100 + k * 10 + n)
    a = torch.randn(16, 32, generator=gen).bfloat16()  # rows of pairs of inputs
    b = torch.randn(16, 32, generator=gen).bfloat16()  # row p: pair p of inputs for each of 16 columns
    c = torch.randn(16, 16, generator=gen)
    expected = c.clone()
    pairs_b = b.float().view(16, 16, 2)[:k, :n]  # [pair, column, j]
    expected[:m, :n] += torch.einsum("mpj,pnj->mn", a.float().view(16, 16, 2)[:m, :k], pairs_b)
    p = ctypes.c_void_p
    library.product(p(a.data_ptr()), p(b.data_ptr()), p(c.data_ptr()), m, k, n)
    torch.testing.assert_close(c, expected, rtol=1e-6, atol=1e-5)
    assert torch.equal(c[m:], expected[m:]) and torch.equal(c[:, n:], expected[:, n:])


@pytest.mark.parametrize(
    "shapes,why",
    [
        ((16, 64, 8, 64, 16, 64), "the sums' rows differ from the first operand's"),
        ((16, 64, 16, 32, 16, 64), "the first operand's pairs differ from the second's rows"),
        ((16, 32, 16, 64, 16, 64), "the sums' columns differ from the second operand's"),
        ((17, 64, 17, 64, 16, 64), "a tile larger than 16 rows x 64 bytes"),
    ],
)
def test_shapes_the_hardware_refuses_stop_the_process(library, shapes, why):
    """As #UD would (SIGILL): a kernel whose tiles do not chain must not pass its tests here."""
    code = "import ctypes, sys; lib = ctypes.CDLL(sys.argv[1]); lib.shapes(*map(int, sys.argv[2:]))"
    done = subprocess.run(
        [sys.executable, "-c", code, library._name, *map(str, shapes)], capture_output=True, text=True
    )
    assert done.returncode != 0 and why in done.stderr, done.stderr
