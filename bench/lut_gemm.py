"""The BCQ LUT-GEMM kernel (treeq/kernels/cpu_lut_bcq.py) and the SpQR layer against bf16 F.linear
and treeq's int4 kernel, side by side in one process: a 4096 x 4096 linear, M = 1, 4, 16, 64
tokens, 1 and 2 threads; LUT at 2, 3 and 4 bit-planes (group 128, with offset) on the AVX512 path,
and at 3 planes on the AVX2 path ($TREEQ_CPU_ISA=avx2 for that column only); SpQR as
bench/spqr_kernel.py builds it (3-bit codes in groups of 16 plus its sparse outliers; that script
splits its time into the dense and the sparse part); int4 is RTN group 128 through the kernel
selection picks (cpu_int4_avx512 on AVX512-BF16 CPUs). Ratios are bf16 time / kernel time.

``--dense``: the LUT path against the kernel's dense path (fp32 GEMM over the dequantized weight) at
each number of planes, M = 1 to 1024 tokens: where cpu_lut_bcq.DENSE_FROM belongs.

Usage: python bench/lut_gemm.py [--threads 1,2] [--repeats 40] [--dense]
"""

from __future__ import annotations

import functools
import os

import click
import machine
import torch
import torch.nn.functional as F
from kernel_speed import _quant_linear  # run as a script, bench/ is on sys.path
from spqr_kernel import spqr_linear
from timing import median_seconds

from treeq import bcq
from treeq.kernels import cpu_lut_bcq

N = 4096
GROUP = 128
TOKENS = (1, 4, 16, 64)
DENSE_TOKENS = (1, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def random_bcq(planes: int) -> bcq.BCQWeight:
    """Random bit-planes, alphas and offsets: the kernel's time does not depend on the values (a fit
    of a 4096 x 4096 weight takes longer than the whole table)."""
    gen = torch.Generator().manual_seed(planes)
    return bcq.BCQWeight(
        planes=torch.randint(0, 256, (planes, N, N // bcq.SLICE), dtype=torch.uint8, generator=gen),
        alphas=(torch.rand(planes, N // GROUP, N, generator=gen) * 0.01).half(),
        offsets=torch.randn(N // GROUP, N, generator=gen) * 1e-3,
        group_size=GROUP,
    )


def lut_call(state, x, isa: str | None = None, dense: bool = False):
    """One matmul on the LUT path (the ISA ``isa``, "avx2", forces, or the CPU's best) or, with
    ``dense``, on the dense path, whatever DENSE_FROM says."""

    def call():
        before, dense_from = os.environ.get("TREEQ_CPU_ISA"), cpu_lut_bcq.DENSE_FROM
        if isa is not None:
            os.environ["TREEQ_CPU_ISA"] = isa
        cpu_lut_bcq.DENSE_FROM = dict.fromkeys(bcq.PLANES, 0 if dense else None)
        try:
            return cpu_lut_bcq.matmul(state, x)
        finally:
            cpu_lut_bcq.DENSE_FROM = dense_from
            os.environ.pop("TREEQ_CPU_ISA", None) if before is None else os.environ.__setitem__("TREEQ_CPU_ISA", before)

    return call


@click.command()
@click.option("--threads", default="1,2", show_default=True)
@click.option("--repeats", type=int, default=40, show_default=True)
@click.option("--dense", "dense_path", is_flag=True, help="LUT against dense path, M = 1 to 1024")
def main(threads: str, repeats: int, dense_path: bool) -> None:
    dense = (torch.randn(N, N, generator=torch.Generator().manual_seed(0)) * 0.02).bfloat16()
    states = {q: cpu_lut_bcq.prepare(random_bcq(q)) for q in bcq.PLANES}
    # column name -> (tokens x -> one call)
    if dense_path:
        columns = {
            f"{p} q{q}": functools.partial(lut_call, states[q], dense=p == "dense")
            for q in bcq.PLANES
            for p in ("lut", "dense")
        }
        kernels = "dense = the kernel's dense path, dequantization included"
    else:
        int4 = _quant_linear(4, GROUP, N)
        columns = {"int4 g128": lambda x: lambda: int4(x)}
        columns |= {f"lut q{q}": functools.partial(lut_call, states[q]) for q in bcq.PLANES}
        columns["lut q3 avx2"] = functools.partial(lut_call, states[3], isa="avx2")
        spqr = spqr_linear(N)
        columns["spqr 3b g16"] = lambda x: lambda: spqr(x)
        share = spqr.extras.nnz / N**2
        kernels = f"int4 = {int4.kernel.name}; spqr = {spqr.kernel.name} + sparse CSR ({share:.2%} outliers)"
    print(machine.cpu())
    print(f"matmul {N}x{N}, group {GROUP}, median of {repeats} calls taken in turns, times in ms;")
    path = cpu_lut_bcq.path()
    print(f"ratio = bf16 F.linear time / kernel time; {kernels}; lut path at 1 token: {path}")
    header = " ".join(f"{c:>12} {'ratio':>6}" for c in columns)
    print(f"{'threads':>7} {'M':>3} {'bf16':>8} {header}")
    for t in (int(v) for v in threads.split(",")):
        torch.set_num_threads(t)
        for m in DENSE_TOKENS if dense_path else TOKENS:
            x = torch.randn(m, N, dtype=torch.bfloat16)
            fns = [lambda: F.linear(x, dense)] + [call(x) for call in columns.values()]
            with torch.no_grad():
                base, *times = median_seconds(fns, repeats)
            cells = " ".join(f"{s * 1e3:>12.3f} {base / s:>5.2f}x" for s in times)
            print(f"{t:>7} {m:>3} {base * 1e3:>8.3f} {cells}", flush=True)


if __name__ == "__main__":
    main()
