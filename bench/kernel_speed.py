"""Quantized CPU kernels against bf16, side by side in one process.

1. Matmul: a 4096 x 4096 linear (or each of ``--shapes``) through QuantLinear with the int4 kernel
   selection picks (group 128; 64 where the inputs are no multiple of 128), cpu_int4 (torch's fused
   int4 op, a blocked bf16 GEMM for long prompts), the int8 kernel selection picks (per row) and
   cpu_int8 (torch's int8 op, the same GEMM for long prompts), against bf16 F.linear, for M = 1 to
   2048 tokens, at 1 and 2 threads; each cell names the kernel path that ran ("gemm": dequantize a block
   of rows, then oneDNN's bf16 GEMM; the header says whether into oneDNN's own blocked layout). The
   header names the CPU and its AMX / AVX512-BF16 (the selection honours $TREEQ_CPU_ISA, so an AMX
   machine can measure its non-AMX paths too).
2. Decode: prefill (of each ``--prompt-tokens``) and batch-1 greedy decode tokens/s of RTN 4-bit
   checkpoints loaded in bf16 (the selected kernel, and cpu_int4 forced) against the same
   architecture in bf16 (SmolLM2-135M at group 64, a random Llama 2048 x 16 layers at group 128;
   bench/model_speed.py); ``--model-bits 8``: 8-bit per-row checkpoints, cpu_int8 forced beside.

Usage: python bench/kernel_speed.py [--threads 1,2] [--skip-decode] [--prompt-tokens 30,1024]
       [--shapes 4096x4096,576x576] [--model-bits 4|8]
"""

from __future__ import annotations

import click
import torch
import torch.nn.functional as F
from model_speed import short_calibration, speed_table  # bench/: run as a script, bench/ is on sys.path
from timing import MAX_ROUNDS, median_seconds

from treeq.config import QuantConfig
from treeq.kernels import LinearFormat, blocked_gemm, cpu_int4, cpu_int4_avx512, cpu_int8, cpu_int8_avx512, cpu_isa
from treeq.methods import InputStats, make_method
from treeq.runtime.quant_linear import QuantLinear

MATMUL_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 2048)
# Seconds of timed rounds per cell: a small layer's long-prompt call takes a millisecond or less,
# and 8 rounds of it left medians 10-30% apart from run to run on a VM.
ROUND_BUDGET = 2.0
# The kernels that choose a path per call by the number of tokens; the others have one.
PATHS = {
    "cpu_int4_avx512": lambda layer, m: cpu_int4_avx512.path(
        m, layer.kernel_state.amx, layer.kernel_state.group_size, layer.out_features, layer.in_features
    ),
    "cpu_int4": lambda layer, m: cpu_int4.path(m, layer.kernel_state.native_bf16),
    "cpu_int8": lambda layer, m: cpu_int8.path(m, layer.kernel_state.native_bf16),
    "cpu_int8_avx512": lambda layer, m: cpu_int8_avx512.path(
        m, layer.kernel_state.amx, layer.out_features, layer.in_features
    ),
}


def _quant_linear(
    bits: int, group_size: int, n: int, kernel: str | None = None, n_in: int | None = None
) -> QuantLinear:
    """An RTN-quantized [n, n_in] linear (n_in: n by default) with ``kernel`` (default: the selection's)."""
    n_in = n_in or n
    w = torch.randn(n, n_in) * 0.02
    stats = InputStats(n_in, torch.device("cpu"))
    stats.add(torch.randn(64, n_in))
    result = make_method(QuantConfig(method="rtn", bits=bits, group_size=group_size)).quantize(w, stats)
    layer = QuantLinear.from_result(LinearFormat(bits, group_size, True, False, n_in, n), result, None)
    layer.select_kernel("cpu", torch.bfloat16, kernel)
    return layer


def matmul_table(threads: list[int], n: int = 4096, n_in: int = 4096) -> None:
    dense = torch.randn(n, n_in, dtype=torch.bfloat16) * 0.02
    group = 128 if n_in % 128 == 0 else 64  # SmolLM2's 576 inputs take groups of 64
    layers = {
        f"int4 g{group}": _quant_linear(4, group, n, n_in=n_in),
        "int4 op": _quant_linear(4, group, n, "cpu_int4", n_in=n_in),
        "int8 row": _quant_linear(8, -1, n, n_in=n_in),
        "int8 op": _quant_linear(8, -1, n, "cpu_int8", n_in=n_in),
    }
    print(f"\n{cpu_isa.describe()}")
    block = blocked_gemm.block_rows(n, n_in)[1]
    layout = f"oneDNN's blocked layout ({block}-row blocks)" if block else "rows (oneDNN's layout differs here)"
    print(f"gemm path: 4-bit weights dequantized into {layout}, 8-bit ones into rows")
    print(
        f"matmul {n}x{n_in} (outputs x inputs), median of 40 calls (8 from 256 tokens on; more, up to"
        f" {MAX_ROUNDS}, where {ROUND_BUDGET:g} s allow) taken in turns, in ms;"
    )
    print("ratio = bf16 time / kernel time; path: the kernel's path for that many tokens")
    print(f"{'threads':>7} {'M':>4} {'bf16':>8} " + " ".join(f"{k:>10} {'ratio':>6} {'path':>8}" for k in layers))
    for t in threads:
        torch.set_num_threads(t)
        for m in MATMUL_TOKENS:
            x = torch.randn(m, n_in, dtype=torch.bfloat16)
            with torch.no_grad():
                fns = [lambda: F.linear(x, dense)] + [lambda layer=layer: layer(x) for layer in layers.values()]
                base, *kernel_times = median_seconds(fns, 40 if m < 256 else 8, budget=ROUND_BUDGET)
            paths = [PATHS.get(layer.kernel.name, lambda *_: "op")(layer, m) for layer in layers.values()]
            cells = [f"{s * 1e3:>10.3f} {base / s:>5.2f}x {p:>8}" for s, p in zip(kernel_times, paths)]
            print(f"{t:>7} {m:>4} {base * 1e3:>8.3f} " + " ".join(cells), flush=True)
    print(f"kernels: {', '.join(f'{k} -> {v.kernel.name}' for k, v in layers.items())}")


@click.command()
@click.option("--threads", default="1,2", show_default=True, help="thread counts for the matmul table")
@click.option("--decode-threads", type=int, default=2, show_default=True)
@click.option("--new-tokens", type=int, default=32, show_default=True)
@click.option("--repeats", type=int, default=5, show_default=True)
@click.option("--skip-decode", is_flag=True)
@click.option(
    "--prompt-tokens",
    default="",
    help="model speed: prompt lengths, e.g. 30,1024 (repeating the bench prompt); default: the bench prompt",
)
@click.option(
    "--shapes", default="4096x4096", show_default=True, help="matmul tables' OUTxIN shapes, e.g. 576x576,1536x576"
)
@click.option(
    "--model-bits",
    type=click.Choice(["4", "8"]),
    default="4",
    show_default=True,
    help="model speed: RTN checkpoints of 4 bits (groups as below) or 8 bits per row",
)
def main(threads, decode_threads, new_tokens, repeats, skip_decode, prompt_tokens, shapes, model_bits):
    for shape in filter(None, shapes.split(",")):  # --shapes "": the model speed table alone
        n, n_in = (int(v) for v in shape.split("x"))
        matmul_table([int(t) for t in threads.split(",")], n, n_in)
    if not skip_decode:
        bits = int(model_bits)
        configs = {
            "SmolLM2-135M": short_calibration(method="rtn", bits=bits, group_size=64 if bits == 4 else -1),
            "random Llama 2048x16": short_calibration(method="rtn", bits=bits, group_size=128 if bits == 4 else -1),
        }
        variants = {f"int{bits}": {}, f"int{bits} op": {"kernel": f"cpu_int{bits}"}}
        lengths = [int(n) for n in prompt_tokens.split(",")] if prompt_tokens else [None]
        speed_table(configs, variants, lengths, [decode_threads], new_tokens, repeats)


if __name__ == "__main__":
    main()
