"""Two git revisions of treeq's AVX512-BF16 kernels, A/B in one process, each order once.

The same layer (RTN 4-bit g128 or 8-bit per row, random weights) runs through each revision's build
of ``treeq_int4_matmul`` / ``treeq_int8_matmul`` on one native path, interleaved with bf16 F.linear.
The build timed second in a round gains from the first one's weights left in cache (the same build
twice read 1.06-1.11x as fast at 8 tokens on 5632 x 2048, AMD Zen 4), so each cell is measured in
both orders and the geometric mean of the two ratios is the figure to quote. Outputs must be equal
bit for bit (the script checks), so it measures changes that keep the numbers; with
``--sums-reordered`` (a change that adds the same fp32 products in another order) each output may
instead differ by one bf16 step, where the two sums round to either side, or by 2^-8 of the outputs'
root mean square, where a sum near zero cancels and its last bits depend on the order.

Usage: python bench/kernel_ab.py REV_A REV_B --bits 8 --path 5 --shape 5632x2048 --tokens 6,8
       [--threads 2] [--sums-reordered]   (path: the .cpp's argument, e.g. 8-bit 0 panel, 4 rows panel, 5 stream;
                        4-bit 0 vector, 1 expanded, 4 panel)
"""

from __future__ import annotations

import ctypes
import math
import subprocess
import tempfile
from pathlib import Path

import click
import machine  # bench/: run as a script, bench/ is on sys.path
import torch
import torch.nn.functional as F
from kernel_speed import _quant_linear
from timing import median_seconds

from treeq import native
from treeq.kernels import cpu_int4_avx512

REPO = Path(__file__).resolve().parent.parent
KERNELS = "treeq/kernels"


def build_at(rev: str, function: str, into: Path) -> ctypes.CDLL:
    """The library of revision ``rev``'s kernel source that defines ``function`` (its kernels folder
    unpacked under ``into``, so the sources' local headers come with them)."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, KERNELS], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    for source in sorted((into / KERNELS).glob("*.cpp")):
        if f"{function}(" in source.read_text():
            lib, why = native.build(source, cpu_int4_avx512.FLAGS)
            if lib is None:
                raise click.ClickException(f"{rev}: {why}")
            return lib
    raise click.ClickException(f"{rev}: no kernel source defines {function}")


def int8_call(lib: ctypes.CDLL, layer, path: int):
    st, n = layer.kernel_state, layer.out_features

    def call(x: torch.Tensor) -> torch.Tensor:
        y = torch.empty(x.shape[0], n, dtype=torch.bfloat16)
        lib.treeq_int8_matmul(ctypes.c_void_p(x.data_ptr()), ctypes.c_int64(x.shape[0]), ctypes.c_int64(x.shape[1]),
                              ctypes.c_void_p(st.weight.data_ptr()), ctypes.c_void_p(st.scale32.data_ptr()),
                              ctypes.c_void_p(st.zero.data_ptr()), ctypes.c_int64(n), ctypes.c_void_p(y.data_ptr()),
                              ctypes.c_int(torch.get_num_threads()), ctypes.c_int(path))  # fmt: skip
        return y

    return call


def int4_call(lib: ctypes.CDLL, layer, path: int):
    st, n = layer.kernel_state, layer.out_features
    packed, scales, zeros, _, group_size = st.weight_args

    def call(x: torch.Tensor) -> torch.Tensor:
        y = torch.empty(x.shape[0], n, dtype=torch.bfloat16)
        lib.treeq_int4_matmul(ctypes.c_void_p(x.data_ptr()), ctypes.c_int64(x.shape[0]), ctypes.c_int64(x.shape[1]),
                              ctypes.c_void_p(packed), ctypes.c_void_p(scales), ctypes.c_void_p(zeros),
                              ctypes.c_int64(n), ctypes.c_int64(group_size), ctypes.c_void_p(y.data_ptr()),
                              ctypes.c_int(torch.get_num_threads()), ctypes.c_int(path))  # fmt: skip
        return y

    return call


def ordered(y: torch.Tensor) -> torch.Tensor:
    """bf16 values as integers in the values' order, adjacent values one apart (sign and magnitude
    to two's complement)."""
    i = y.view(torch.int16).int()
    return torch.where(i < 0, -32768 - i, i)


@click.command()
@click.argument("rev_a")
@click.argument("rev_b")
@click.option("--bits", type=click.Choice(["4", "8"]), default="8", show_default=True)
@click.option("--path", "path", type=int, required=True, help="the .cpp's path argument")
@click.option("--shape", default="5632x2048", show_default=True, help="OUTxIN")
@click.option("--tokens", default="8,256", show_default=True)
@click.option("--threads", default="2", show_default=True)
@click.option("--sums-reordered", is_flag=True, help="allow one bf16 step between the outputs")
def main(
    rev_a: str, rev_b: str, bits: str, path: int, shape: str, tokens: str, threads: str, sums_reordered: bool
) -> None:
    n, k = (int(v) for v in shape.split("x"))
    layer = _quant_linear(int(bits), 128 if bits == "4" else -1, n, n_in=k)
    dense = torch.randn(n, k, dtype=torch.bfloat16) * 0.02
    function, make = ("treeq_int8_matmul", int8_call) if bits == "8" else ("treeq_int4_matmul", int4_call)
    with tempfile.TemporaryDirectory() as tmp:
        a = make(build_at(rev_a, function, Path(tmp) / "a"), layer, path)
        b = make(build_at(rev_b, function, Path(tmp) / "b"), layer, path)
        print(machine.cpu())
        print(f"{bits}-bit {shape}, path {path}: B/A = how much faster {rev_b} ran than {rev_a}")
        for t in (int(v) for v in threads.split(",")):
            torch.set_num_threads(t)
            for m in (int(v) for v in tokens.split(",")):
                x = torch.randn(m, k, dtype=torch.bfloat16)
                ya, yb = a(x), b(x)
                steps = (ordered(ya) - ordered(yb)).abs()
                if sums_reordered:
                    cancelled = (ya.float() - yb.float()).abs() <= ya.float().pow(2).mean().sqrt() / 256
                    steps = torch.where(cancelled, 0, steps)
                if steps.max().item() > (1 if sums_reordered else 0):
                    raise click.ClickException(f"the two revisions' outputs differ at {m} tokens")
                fns = [lambda: F.linear(x, dense), lambda: a(x), lambda: b(x)]
                bf16, ta, tb = median_seconds(fns, 8, budget=3)
                _, tb2, ta2 = median_seconds([fns[0], fns[2], fns[1]], 8, budget=3)
                first, second = ta / tb, ta2 / tb2
                print(f"threads {t} tokens {m:5d}: bf16/A {bf16 / ta:.3f}x bf16/B {bf16 / tb:.3f}x | "
                      f"B/A {first:.3f} (B second) {second:.3f} (B first) -> {math.sqrt(first * second):.3f}",
                      flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
