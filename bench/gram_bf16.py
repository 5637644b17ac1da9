"""One calibration batch's input statistics, h = keep * h + x^T x / n, by each route side by side:
fp32 addmm of the bf16-rounded inputs (the baseline, and the route of CPUs without native bf16),
the same addmm in oneDNN's bf16 mode (the AMX route; CPUs without AMX ignore the mode) and
treeq's AVX512-BF16 kernel (the route of CPUs without AMX). Best of --repeats, per thread count;
on one thread the CPU time of the calling thread (which runs it all), which other processes on a
shared machine barely move, else wall time.

Usage: python bench/gram_bf16.py [--threads 1,2] [--shapes 4096x576,4096x1536,4096x4096]
"""

from __future__ import annotations

import time

import click
import torch

from treeq.kernels import cpu_isa, gram_bf16
from treeq.methods.base import _cpu_matmul_inputs


def best_ms(fn, repeats: int) -> float:
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        fn()
        best = min(best, clock() - start)
    return best * 1e3


@click.command()
@click.option("--threads", default="1,2", show_default=True)
@click.option("--shapes", default="4096x576,4096x1536,4096x4096", show_default=True, help="tokens x features")
@click.option("--repeats", type=int, default=10, show_default=True)
def main(threads: str, shapes: str, repeats: int):
    lib, why = gram_bf16.library()
    print(cpu_isa.describe())
    if lib is None:
        print(f"kernel unavailable: {why}")
    print(f"{'threads':>7} {'n x d':>11} {'fp32 ms':>8} {'onednn bf16 ms':>14} {'kernel ms':>9} {'fp32 / kernel':>13}")
    for t in [int(v) for v in threads.split(",")]:
        torch.set_num_threads(t)
        for shape in shapes.split(","):
            n, d = (int(v) for v in shape.split("x"))
            x = (torch.randn(n, d) * torch.rand(d) * 4).bfloat16()
            rounded = x.float()
            h = torch.zeros(d, d)
            fp32 = best_ms(lambda: h.mul_(0.5).addmm_(rounded.T, rounded, alpha=1 / n), repeats)

            def onednn():
                with _cpu_matmul_inputs(torch.bfloat16):
                    h.mul_(0.5).addmm_(rounded.T, rounded, alpha=1 / n)

            mode = best_ms(onednn, repeats)
            if lib is None:
                print(f"{t:>7} {shape:>11} {fp32:>8.1f} {mode:>14.1f} {'-':>9} {'-':>13}")
                continue
            kernel = best_ms(lambda: gram_bf16.gram_update(h, x, 0.5, 1 / n), repeats)
            print(f"{t:>7} {shape:>11} {fp32:>8.1f} {mode:>14.1f} {kernel:>9.1f} {fp32 / kernel:>13.2f}")


if __name__ == "__main__":
    main()
