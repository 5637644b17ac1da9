"""The BCQ LUT-GEMM kernel (treeq/kernels/cpu_lut_bcq.py) against bf16 F.linear and treeq's int4
kernel, side by side in one process: a 4096 x 4096 linear, M = 1, 4, 16, 64 tokens, 1 and 2
threads; LUT at 2, 3 and 4 bit-planes (group 128, with offset) on the AVX512 path, and at 3 planes
on the AVX2 path ($TREEQ_CPU_ISA=avx2 for that column only); int4 is RTN group 128 through the
kernel selection picks (cpu_int4_avx512 on AVX512-BF16 CPUs). Ratios are bf16 time / kernel time.

Usage: python bench/lut_gemm.py [--threads 1,2] [--repeats 40]
"""

from __future__ import annotations

import os

import click
import machine
import torch
import torch.nn.functional as F
from kernels import _quant_linear  # bench/kernels.py: run as a script, bench/ is on sys.path
from timing import median_seconds

from treeq import bcq
from treeq.kernels import cpu_lut_bcq

N = 4096
GROUP = 128
TOKENS = (1, 4, 16, 64)


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


def lut_call(state, x, isa: str | None):
    """One LUT matmul, on the path ``isa`` ("avx2") forces, or the CPU's best."""
    if isa is None:
        return lambda: cpu_lut_bcq.matmul(state, x)

    def call():
        before = os.environ.get("TREEQ_CPU_ISA")
        os.environ["TREEQ_CPU_ISA"] = isa
        try:
            return cpu_lut_bcq.matmul(state, x)
        finally:
            os.environ.pop("TREEQ_CPU_ISA") if before is None else os.environ.__setitem__("TREEQ_CPU_ISA", before)

    return call


@click.command()
@click.option("--threads", default="1,2", show_default=True)
@click.option("--repeats", type=int, default=40, show_default=True)
def main(threads: str, repeats: int) -> None:
    dense = (torch.randn(N, N, generator=torch.Generator().manual_seed(0)) * 0.02).bfloat16()
    int4 = _quant_linear(4, GROUP, N)
    states = {q: cpu_lut_bcq.prepare(random_bcq(q)) for q in bcq.PLANES}
    columns = [f"lut q{q}" for q in bcq.PLANES] + ["lut q3 avx2"]
    print(machine.cpu())
    print(f"matmul {N}x{N}, group {GROUP}, median of {repeats} calls taken in turns, times in ms;")
    path = cpu_lut_bcq.path()
    print(f"ratio = bf16 F.linear time / kernel time; int4 = {int4.kernel.name}; lut path at 1 token: {path}")
    header = " ".join(f"{c:>12} {'ratio':>6}" for c in ["int4 g128", *columns])
    print(f"{'threads':>7} {'M':>3} {'bf16':>8} {header}")
    for t in (int(v) for v in threads.split(",")):
        torch.set_num_threads(t)
        for m in TOKENS:
            x = torch.randn(m, N, dtype=torch.bfloat16)
            fns = [lambda: F.linear(x, dense), lambda: int4(x)]
            fns += [lut_call(states[q], x, None) for q in bcq.PLANES] + [lut_call(states[3], x, "avx2")]
            with torch.no_grad():
                base, *times = median_seconds(fns, repeats)
            cells = " ".join(f"{s * 1e3:>12.3f} {base / s:>5.2f}x" for s in times)
            print(f"{t:>7} {m:>3} {base * 1e3:>8.3f} {cells}", flush=True)


if __name__ == "__main__":
    main()
