"""The SpQR layer's matmul against bf16 F.linear and treeq's int4 kernel, side by side in one process.

A 4096 x 4096 linear quantized by SpQR (3-bit codes, groups of 16, scales on the second level,
outlier_threshold 0.3; the inputs' second moment from 256 random tokens with uneven channel scales)
runs as QuantLinear does: the kernel selection picks for its dense part (the reference kernel:
no fused kernel takes 3-bit codes in groups of 16) plus the outliers' torch sparse CSR matmul; the
two parts are timed alone too. Against bf16 F.linear and the int4 kernel selection picks for a 4-bit
group-128 RTN layer (bench/kernel_speed.py's), for M = 1, 4, 16, 64 tokens at 1 and 2 threads; median of
the calls taken in turns (bench/timing.py). Figures to bench/results/spqr_kernel.md.

    flock /tmp/treeq-heavy.lock python bench/spqr_kernel.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this tree's treeq, not the installed one
import machine  # noqa: E402
from kernel_speed import _quant_linear  # noqa: E402
from timing import median_seconds  # noqa: E402

from treeq.config import QuantConfig  # noqa: E402
from treeq.kernels import LinearFormat  # noqa: E402
from treeq.methods import make_method  # noqa: E402
from treeq.runtime.quant_linear import QuantLinear  # noqa: E402

TOKENS = (1, 4, 16, 64)
RESULTS = Path(__file__).parent / "results" / "spqr_kernel.md"


def spqr_linear(n: int) -> QuantLinear:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, n, generator=g) * 0.02
    cfg = QuantConfig(method="spqr", bits=3, group_size=16, sym=False, outlier_threshold=0.3)
    method = make_method(cfg)
    stats = method.stats(n, torch.device("cpu"))
    stats.add(torch.randn(256, n, generator=g) * torch.rand(n, generator=g) * 2)
    result = method.quantize(w, stats)
    fmt = LinearFormat(3, 16, False, True, n, n, extras=result.extras.kind)
    layer = QuantLinear.from_result(fmt, result, None)
    layer.select_kernel("cpu", torch.bfloat16)
    return layer


@click.command()
@click.option("--threads", default="1,2", show_default=True)
@click.option("--n", type=int, default=4096, show_default=True)
@click.option("--repeats", type=int, default=20, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=RESULTS, show_default=True)
def main(threads, n, repeats, out):
    spqr = spqr_linear(n)
    int4 = _quant_linear(4, 128, n)
    dense = torch.randn(n, n, dtype=torch.bfloat16) * 0.02
    share = spqr.extras.nnz / (n * n)
    lines = [
        machine.cpu(),
        f"matmul {n}x{n}, bf16 inputs, median of {repeats} calls taken in turns, times in ms; "
        "ratio = bf16 time / that time",
        f"spqr: 3-bit g16, outliers {share:.2%} of weights; dense part on kernel {spqr.kernel.name}, "
        f"then the sparse CSR matmul; int4: 4-bit g128 on kernel {int4.kernel.name}",
        "",
        "| threads | M | bf16 ms | spqr ms | spqr ratio | dense part ms | sparse part ms | int4 ms | int4 ratio |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    print("\n".join(lines), flush=True)
    for t in [int(x) for x in threads.split(",")]:
        torch.set_num_threads(t)
        for m in TOKENS:
            x = torch.randn(m, n, dtype=torch.bfloat16)
            with torch.no_grad():
                fns = [
                    lambda: F.linear(x, dense),
                    lambda: spqr(x),
                    lambda: spqr.kernel.forward(spqr, x),
                    lambda: spqr.extras_state.matmul(x),
                    lambda: int4(x),
                ]
                base, whole, dense_part, sparse_part, int4_s = median_seconds(fns, repeats)
            row = (
                f"| {t} | {m} | {base * 1e3:.3f} | {whole * 1e3:.3f} | {base / whole:.2f}x | {dense_part * 1e3:.3f} "
                f"| {sparse_part * 1e3:.3f} | {int4_s * 1e3:.3f} | {base / int4_s:.2f}x |"
            )
            lines.append(row)
            print(row, flush=True)
    out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
